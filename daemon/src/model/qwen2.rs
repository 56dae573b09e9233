//! Qwen2 / Qwen2.5: the Llama block with Q/K/V biases and NeoX RoPE.

use ggml_shim::Tensor;

use super::{ModelError, StageGraph};

pub(super) fn build<'a>(sg: &StageGraph<'a>) -> Result<Tensor<'a>, ModelError> {
    let kq_scale = 1.0 / (sg.hp.head_dim_k as f32).sqrt();
    let mut x = sg.input(None)?;
    for il in sg.range.start..sg.range.end {
        let normed = sg.rms_norm(x, sg.lw(il, "attn_norm.weight")?);
        // Q/K/V biases (attn_*.bias) are applied inside `qkv` when present.
        let (q, k, v) = sg.qkv(il, normed)?;
        let (q, k) = (sg.rope(il, q), sg.rope(il, k));
        let attn = sg.attention(il, q, k, v, kq_scale)?;
        let attn = sg.proj(il, "attn_output", attn)?;
        let residual = sg.g.add(sg.select_rows(il, attn), sg.select_rows(il, x));
        let ffn = sg.ffn_silu(il, sg.rms_norm(residual, sg.lw(il, "ffn_norm.weight")?))?;
        x = sg.g.add(ffn, residual);
    }
    sg.finish(x)
}
