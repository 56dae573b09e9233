//! A synthetic SentencePiece vocabulary of a shape's size, with the special tokens of
//! the published model at their ids and its chat template.
//!
//! The published models use byte-level BPE (`tokenizer.ggml.model = "gpt2"`); a
//! synthetic BPE vocabulary would need a consistent merge list, while a SentencePiece
//! ("llama") one only needs pieces and scores, which llama.cpp loads and tokenizes at any
//! size. The layout: `<unk>` = 0, `<0x00>`..`<0xFF>` = 1..=256, then ordinary pieces
//! (`▁`, punctuation, then every string over a-z by length, each with and without a
//! leading `▁`, longer pieces scored higher so merges reach them) up to the first special
//! id; the specials fill the rest (Llama 3: 128000 `<|begin_of_text|>` .. 128255; Qwen2.5:
//! 151643 `<|endoftext|>` .. 151935).

use ggml_shim::writer::GgufWriter;

use super::{GenArch, GenError, Shape};

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp defines them.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;

/// Ids below the ordinary pieces: `<unk>` and the 256 byte tokens.
const FIRST_PIECE: usize = 257;

/// Smallest vocabulary: `<unk>`, the bytes, a few pieces and the specials.
pub const MIN_VOCAB: usize = 1024;

/// Llama 3 Instruct's chat template.
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// ChatML, Qwen2.5's turn format (without its default system prompt).
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The special tokens of an architecture's published tokenizer, from its first id on.
struct Specials {
    /// How many ids at the end of the vocabulary are special.
    count: usize,
    /// Named specials, by offset from the first special id; the others are reserved.
    named: &'static [&'static str],
    /// Offsets of BOS, EOS and padding.
    bos: usize,
    eos: usize,
    pad: usize,
    add_bos: bool,
    template: &'static str,
}

fn specials(arch: GenArch) -> Specials {
    match arch {
        // Llama 3: 256 specials from 128000; BOS `<|begin_of_text|>`, EOS `<|eot_id|>`
        // (the Instruct GGUFs' choice), padding `<|finetune_right_pad_id|>`.
        GenArch::Llama => Specials {
            count: 256,
            named: &[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>",
                "<|reserved_special_token_2|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
            ],
            bos: 0,
            eos: 9,
            pad: 4,
            add_bos: true,
            template: LLAMA3_TEMPLATE,
        },
        // Qwen2.5: specials from 151643 to the end of the 151936-row table; BOS and
        // padding `<|endoftext|>`, EOS `<|im_end|>`, no BOS added.
        GenArch::Qwen2 => Specials {
            count: 293,
            named: &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos: 0,
            eos: 2,
            pad: 0,
            add_bos: false,
            template: CHATML_TEMPLATE,
        },
    }
}

/// Ordinary pieces, best last: `▁`, punctuation, then strings over a-z by length, each
/// as `▁s` and `s`, until `n` pieces.
fn pieces(n: usize) -> Vec<String> {
    let mut out: Vec<String> = ["▁", ".", ",", "!", "?", "'", "-", ":"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let mut len = 1u32;
    'outer: while out.len() < n {
        for i in 0..26usize.pow(len) {
            let mut s = String::new();
            let mut x = i;
            for _ in 0..len {
                s.insert(0, char::from(b'a' + (x % 26) as u8));
                x /= 26;
            }
            for p in [format!("▁{s}"), s] {
                if out.len() == n {
                    break 'outer;
                }
                out.push(p);
            }
        }
        len += 1;
    }
    out.truncate(n);
    out
}

/// Sets the `tokenizer.*` keys of `shape`.
pub(super) fn set_tokenizer(w: &mut GgufWriter, shape: &Shape) -> Result<(), GenError> {
    let sp = specials(shape.arch);
    let n = shape.n_vocab;
    // (n >= MIN_VOCAB leaves room for the pieces: Shape::check)
    let first_special = n - sp.count;
    let mut tokens = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    tokens.push("<unk>".to_owned());
    scores.push(0.0);
    types.push(UNKNOWN);
    for b in 0..=255u32 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(BYTE);
    }
    for p in pieces(first_special - FIRST_PIECE) {
        // Longer pieces first, then earlier ones: merges reach whole strings.
        scores.push(p.chars().count() as f32 - tokens.len() as f32 * 1e-6);
        tokens.push(p);
        types.push(NORMAL);
    }
    for i in 0..n - first_special {
        let text = match sp.named.get(i) {
            Some(name) => (*name).to_owned(),
            None => format!("<|reserved_special_token_{i}|>"),
        };
        tokens.push(text);
        scores.push(0.0);
        types.push(CONTROL);
    }
    let id = |offset: usize| {
        u32::try_from(first_special + offset).map_err(|_| GenError::BadShape {
            name: shape.name,
            why: "vocabulary too large".into(),
        })
    };
    w.set_str("tokenizer.ggml.model", "llama")?;
    w.set_arr_str("tokenizer.ggml.tokens", &tokens)?;
    w.set_arr_f32("tokenizer.ggml.scores", &scores)?;
    w.set_arr_i32("tokenizer.ggml.token_type", &types)?;
    w.set_u32("tokenizer.ggml.bos_token_id", id(sp.bos)?)?;
    w.set_u32("tokenizer.ggml.eos_token_id", id(sp.eos)?)?;
    w.set_u32("tokenizer.ggml.unknown_token_id", 0)?;
    w.set_u32("tokenizer.ggml.padding_token_id", id(sp.pad)?)?;
    w.set_bool("tokenizer.ggml.add_bos_token", sp.add_bos)?;
    w.set_bool("tokenizer.ggml.add_eos_token", false)?;
    w.set_bool("tokenizer.ggml.add_space_prefix", true)?;
    w.set_str("tokenizer.chat_template", sp.template)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_distinct_and_of_the_asked_number() {
        for n in [10, 1000, 127_743] {
            let p = pieces(n);
            assert_eq!(p.len(), n);
            let set: std::collections::HashSet<&String> = p.iter().collect();
            assert_eq!(set.len(), n);
        }
        assert_eq!(&pieces(12)[8..], ["▁a", "a", "▁b", "b"]);
    }
}
