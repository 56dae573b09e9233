//! Checks of a GGUF's tokenizer metadata that llama.cpp asserts on (and so aborts the
//! process) instead of reporting: run before llama.cpp reads the vocabulary.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::gguf::{Gguf, Value};

const TOKENS_KEY: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPE_KEY: &str = "tokenizer.ggml.token_type";
/// llama.cpp's `LLAMA_TOKEN_TYPE_BYTE`.
const TOKEN_TYPE_BYTE: i32 = 6;

/// Why a vocabulary would make llama.cpp abort, or `Ok` when it would load or fail cleanly.
pub(super) fn check_vocabulary(gguf: &Gguf) -> Result<(), String> {
    // Absent or mistyped lists are reported by llama.cpp itself with an error.
    let Some(tokens) = gguf.string_array_bytes(TOKENS_KEY) else {
        return Ok(());
    };
    check_unique(&tokens)?;
    if let Some(Value::ArrI32(types)) = gguf.get(TOKEN_TYPE_KEY) {
        check_byte_tokens(&tokens, &types)?;
    }
    Ok(())
}

/// llama.cpp maps each token's text to its id and asserts the map is as large as the list
/// (`GGML_ASSERT(id_to_token.size() == token_to_id.size())`); empty texts become
/// `[EMPTY_<i>]` first, as there.
fn check_unique(tokens: &[&[u8]]) -> Result<(), String> {
    let mut seen: HashMap<Cow<'_, [u8]>, usize> = HashMap::with_capacity(tokens.len());
    for (i, &text) in tokens.iter().enumerate() {
        let key: Cow<'_, [u8]> = if text.is_empty() {
            Cow::Owned(format!("[EMPTY_{i}]").into_bytes())
        } else {
            Cow::Borrowed(text)
        };
        if let Some(first) = seen.insert(key, i) {
            return Err(format!(
                "{TOKENS_KEY}: tokens {first} and {i} are the same text {:?}",
                String::from_utf8_lossy(shown(tokens[i]))
            ));
        }
    }
    Ok(())
}

/// A byte token's text must be `<0xHH>`: llama.cpp cuts the two hex digits out of it when
/// it meets the token, and a shorter text throws through its C API.
fn check_byte_tokens(tokens: &[&[u8]], types: &[i32]) -> Result<(), String> {
    for (i, (&text, &ty)) in tokens.iter().zip(types).enumerate() {
        let well_formed = text.len() == 6
            && text.starts_with(b"<0x")
            && text.ends_with(b">")
            && text[3..5].iter().all(u8::is_ascii_hexdigit);
        if ty == TOKEN_TYPE_BYTE && !well_formed {
            return Err(format!(
                "{TOKEN_TYPE_KEY}: token {i} is a byte token but its text {:?} is not <0xHH>",
                String::from_utf8_lossy(shown(text))
            ));
        }
    }
    Ok(())
}

/// At most 64 bytes of a token for a message.
fn shown(text: &[u8]) -> &[u8] {
    &text[..text.len().min(64)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_texts_are_found_with_both_ids() {
        let err = check_unique(&[b"a", b"b", b"a"]).unwrap_err();
        assert!(err.contains("tokens 0 and 2"), "{err}");
        check_unique(&[b"a", b"b", b"c"]).unwrap();
    }

    #[test]
    fn empty_texts_are_named_as_llama_cpp_names_them() {
        check_unique(&[b"", b""]).unwrap();
        let err = check_unique(&[b"[EMPTY_1]", b""]).unwrap_err();
        assert!(err.contains("tokens 0 and 1"), "{err}");
    }

    #[test]
    fn byte_tokens_must_spell_their_byte() {
        check_byte_tokens(&[b"<0x0A>", b"ab"], &[TOKEN_TYPE_BYTE, 1]).unwrap();
        let err = check_byte_tokens(&[b"<0x0A>", b"ab"], &[TOKEN_TYPE_BYTE, TOKEN_TYPE_BYTE])
            .unwrap_err();
        assert!(err.contains("token 1"), "{err}");
        assert!(check_byte_tokens(&[b"<0xZZ>"], &[TOKEN_TYPE_BYTE]).is_err());
    }
}
