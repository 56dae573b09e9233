//! Qwen3 (dense): the Llama block with per-head RMS norms on Q and K before NeoX
//! RoPE, no biases.

use ggml_shim::Tensor;

use super::{ModelError, StageGraph};

pub(super) fn build<'a>(sg: &StageGraph<'a>) -> Result<Tensor<'a>, ModelError> {
    let kq_scale = 1.0 / (sg.hp.head_dim_k as f32).sqrt();
    let mut x = sg.input(None)?;
    for il in sg.range.start..sg.range.end {
        let h = sg.rms_norm(x, sg.lw(il, "attn_norm.weight")?);
        let (q, k, v) = sg.qkv(il, h)?;
        let q = sg.rope(il, sg.rms_norm(q, sg.lw(il, "attn_q_norm.weight")?));
        let k = sg.rope(il, sg.rms_norm(k, sg.lw(il, "attn_k_norm.weight")?));
        let h = sg.attention(il, q, k, v, kq_scale)?;
        let h = sg.matmul(sg.lw(il, "attn_output.weight")?, h);
        let after_attn = sg.g.add(sg.select_rows(il, h), sg.select_rows(il, x));
        let h = sg.rms_norm(after_attn, sg.lw(il, "ffn_norm.weight")?);
        x = sg.g.add(sg.ffn_silu(il, h)?, after_attn);
    }
    sg.finish(x)
}
