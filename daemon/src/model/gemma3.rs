//! Gemma 3: embeddings scaled by sqrt(n_embd); interleaved sliding-window and
//! global attention layers (different RoPE bases); RMS norms on Q and K; norms
//! after attention and after the GELU-gated FFN; optional final logit soft-cap.

use ggml_shim::Tensor;

use super::{ModelError, StageGraph};

pub(super) fn build<'a>(sg: &StageGraph<'a>) -> Result<Tensor<'a>, ModelError> {
    let hp = sg.hp;
    // Gemma 3 27B scales queries by the model width per head, the others by head size.
    let q_scale = if hp.n_layer == 62 {
        1.0 / ((hp.n_embd / hp.n_head) as f32).sqrt()
    } else {
        1.0 / (hp.head_dim_k as f32).sqrt()
    };
    let mut x = sg.input(Some((hp.n_embd as f32).sqrt()))?;
    for il in sg.range.start..sg.range.end {
        let cur = sg.rms_norm(x, sg.lw(il, "attn_norm.weight")?);
        let (q, k, v) = sg.qkv(il, cur)?;
        let q = sg.rope(il, sg.rms_norm(q, sg.lw(il, "attn_q_norm.weight")?));
        let k = sg.rope(il, sg.rms_norm(k, sg.lw(il, "attn_k_norm.weight")?));
        let q = sg.g.scale(q, q_scale);
        let cur = sg.attention(il, q, k, v, 1.0)?;
        let cur = sg.proj(il, "attn_output", cur)?;
        let cur = sg.select_rows(il, cur);
        let cur = sg.rms_norm(cur, sg.lw(il, "post_attention_norm.weight")?);
        let sa_out = sg.g.add(cur, sg.select_rows(il, x));
        let cur = sg.rms_norm(sa_out, sg.lw(il, "ffn_norm.weight")?);
        let gate = sg.matmul(sg.lw(il, "ffn_gate.weight")?, cur);
        let up = sg.matmul(sg.lw(il, "ffn_up.weight")?, cur);
        let cur = sg.matmul(sg.lw(il, "ffn_down.weight")?, sg.g.geglu_split(gate, up));
        let cur = sg.rms_norm(cur, sg.lw(il, "post_ffw_norm.weight")?);
        x = sg.g.add(cur, sa_out);
    }
    sg.finish(x)
}
