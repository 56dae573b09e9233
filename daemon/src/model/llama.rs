//! Llama 2/3, Mistral, TinyLlama: RMS norms, GQA attention with normal RoPE
//! (frequency factors from `rope_freqs.weight` for Llama 3), SiLU-gated FFN.

use ggml_shim::Tensor;

use super::{ModelError, StageGraph};

pub(super) fn build<'a>(sg: &StageGraph<'a>) -> Result<Tensor<'a>, ModelError> {
    let kq_scale = 1.0 / (sg.hp.head_dim_k as f32).sqrt();
    let mut x = sg.input(None)?;
    for il in sg.range.start..sg.range.end {
        let cur = sg.rms_norm(x, sg.lw(il, "attn_norm.weight")?);
        let (q, k, v) = sg.qkv(il, cur)?;
        let q = sg.rope(il, q);
        let k = sg.rope(il, k);
        let cur = sg.attention(il, q, k, v, kq_scale)?;
        let cur = sg.proj(il, "attn_output", cur)?;
        let cur = sg.select_rows(il, cur);
        let ffn_in = sg.g.add(cur, sg.select_rows(il, x));
        let cur = sg.rms_norm(ffn_in, sg.lw(il, "ffn_norm.weight")?);
        let cur = sg.ffn_silu(il, cur)?;
        x = sg.g.add(cur, ffn_in);
    }
    sg.finish(x)
}
