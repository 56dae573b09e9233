//! Chat prompts tokenized so that only the template's own markers become special
//! tokens: text from users and assistants never does.
//!
//! llama.cpp tokenizes a text with special-token parsing by first cutting it at the
//! texts of its special tokens (`tokenizer_st_partition` in llama-vocab.cpp: every
//! CONTROL, USER_DEFINED and UNKNOWN token, longest first, each split out of every
//! piece of raw text left, left to right), then tokenizing each raw piece on its own.
//! [`partition`] does the same cut, except that a token that is special only under
//! special-token parsing (CONTROL, UNKNOWN) is not cut where any of its bytes belongs
//! to a message's content; each raw piece (template text and content text as they
//! follow each other) is then tokenized without special-token parsing. For a prompt
//! whose contents hold no special-token text the tokens are exactly llama.cpp's.
//!
//! Where the contents stand in the rendered prompt: the template is rendered a second
//! time with each content replaced by a sentinel, and [`content_ranges`] lines that up
//! with the real rendering (a content may appear trimmed, as Gemma's template does).

use std::ops::Range;

use aho_corasick::AhoCorasick;
use ggml_shim::llama::{SpecialToken, Vocab};
use memchr::memmem;

/// A model's special tokens, as llama.cpp's tokenizer looks for them.
pub(super) struct Specials {
    /// In llama.cpp's search order (longest text first).
    tokens: Vec<SpecialToken>,
    /// All their texts at once, to skip the tokens a text does not hold.
    any: Option<AhoCorasick>,
}

impl Specials {
    pub fn new(vocab: &Vocab) -> Specials {
        Specials::from_tokens(vocab.special_tokens())
    }

    /// `tokens` in llama.cpp's search order.
    pub fn from_tokens(tokens: Vec<SpecialToken>) -> Specials {
        let any = AhoCorasick::new(tokens.iter().map(|t| &t.text)).ok();
        Specials { tokens, any }
    }

    /// Which tokens occur in `text` (overlapping occurrences too), in search order.
    fn present(&self, text: &[u8]) -> Vec<&SpecialToken> {
        let mut seen = vec![false; self.tokens.len()];
        match &self.any {
            Some(ac) => {
                for m in ac.find_overlapping_iter(text) {
                    seen[m.pattern().as_usize()] = true;
                }
            }
            None => {
                for (s, t) in seen.iter_mut().zip(&self.tokens) {
                    *s = memmem::find(text, &t.text).is_some();
                }
            }
        }
        self.tokens
            .iter()
            .zip(seen)
            .filter_map(|(t, s)| s.then_some(t))
            .collect()
    }

    /// The first token (in search order) that is special only under special-token
    /// parsing and whose text `text` holds.
    pub fn parse_special_text_in(&self, text: &[u8]) -> Option<&SpecialToken> {
        self.present(text)
            .into_iter()
            .find(|t| t.parse_special_only)
    }
}

/// A piece of a partitioned text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    /// Bytes to tokenize as plain text.
    Raw(Range<usize>),
    /// A special token cut out of the text.
    Token(i32),
}

/// llama.cpp's `tokenizer_st_partition` of `text` with special-token parsing, except
/// that a token special only under parsing is not cut where it overlaps `content`
/// (sorted, disjoint byte ranges).
pub(super) fn partition(text: &[u8], content: &[Range<usize>], specials: &Specials) -> Vec<Piece> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut pieces = vec![Piece::Raw(0..text.len())];
    for token in specials.present(text) {
        let finder = memmem::Finder::new(&token.text);
        let mut out = Vec::with_capacity(pieces.len() + 2);
        for piece in pieces {
            match piece {
                Piece::Raw(r) => split(text, r, token, &finder, content, &mut out),
                t => out.push(t),
            }
        }
        pieces = out;
    }
    pieces
}

/// Cuts every allowed occurrence of `token` out of the raw piece `r`, left to right,
/// as llama.cpp does (with its LSTRIP / RSTRIP whitespace rules).
fn split(
    text: &[u8],
    r: Range<usize>,
    token: &SpecialToken,
    finder: &memmem::Finder<'_>,
    content: &[Range<usize>],
    out: &mut Vec<Piece>,
) {
    let (mut start, end) = (r.start, r.end);
    let mut from = start;
    loop {
        let Some(at) = finder.find(&text[from..end]).map(|i| from + i) else {
            if start < end {
                out.push(Piece::Raw(start..end));
            }
            return;
        };
        let stop = at + token.text.len();
        if token.parse_special_only && overlaps(content, at..stop) {
            from = at + 1;
            continue;
        }
        let mut left_end = at;
        if token.lstrip {
            while left_end > start && is_c_space(text[left_end - 1]) {
                left_end -= 1;
            }
        }
        if left_end > start {
            out.push(Piece::Raw(start..left_end));
        }
        out.push(Piece::Token(token.id));
        if stop >= end {
            return;
        }
        start = stop;
        if token.rstrip {
            while start < end && is_c_space(text[start]) {
                start += 1;
            }
        }
        from = start;
    }
}

/// C's `isspace` in the "C" locale, which llama.cpp's strip rules use.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Whether any of the sorted, disjoint `ranges` shares a byte with `r`.
fn overlaps(ranges: &[Range<usize>], r: Range<usize>) -> bool {
    let i = ranges.partition_point(|c| c.end <= r.start);
    ranges.get(i).is_some_and(|c| c.start < r.end)
}

/// The sentinel that stands for content `i` in the marked rendering.
pub(super) fn sentinel(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}\u{1}")
}

/// A sentinel prefix that `avoid` does not hold (nor, so, can a rendering hold it
/// unless a content was replaced).
pub(super) fn sentinel_prefix(avoid: &[&str]) -> String {
    (0u64..)
        .map(|n| format!("\u{1}exo-content-{n}:"))
        .find(|p| avoid.iter().all(|a| !a.contains(p.as_str())))
        .unwrap_or_default()
}

/// A piece of the marked rendering.
enum Marked<'a> {
    Literal(&'a str),
    Content(usize),
}

/// `marked` cut into template text and content sentinels; None if a sentinel is
/// malformed (the template changed it).
fn parse_marked<'a>(marked: &'a str, prefix: &str) -> Option<Vec<Marked<'a>>> {
    let mut out = Vec::new();
    let mut rest = marked;
    while let Some(at) = rest.find(prefix) {
        if at > 0 {
            out.push(Marked::Literal(&rest[..at]));
        }
        let after = &rest[at + prefix.len()..];
        let end = after.find('\u{1}')?;
        out.push(Marked::Content(after[..end].parse().ok()?));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Marked::Literal(rest));
    }
    Some(out)
}

/// The byte ranges of the contents in `text` (the template rendered with the real
/// contents), from `marked` (rendered with content `i` replaced by `sentinel(prefix,
/// i)`): each sentinel must stand for its content as is or trimmed (at either end or
/// both), and the rest must be equal. None when `text` cannot be lined up so.
pub(super) fn content_ranges(
    text: &str,
    marked: &str,
    prefix: &str,
    contents: &[&str],
) -> Option<Vec<Range<usize>>> {
    let pieces = parse_marked(marked, prefix)?;
    let bytes = text.as_bytes();
    let mut pos = 0;
    let mut ranges = Vec::new();
    for (k, piece) in pieces.iter().enumerate() {
        match *piece {
            Marked::Literal(s) => {
                if !bytes[pos..].starts_with(s.as_bytes()) {
                    return None;
                }
                pos += s.len();
            }
            Marked::Content(i) => {
                let c = *contents.get(i)?;
                let next = match pieces.get(k + 1) {
                    Some(Marked::Literal(s)) => *s,
                    _ => "",
                };
                let fits = |cand: &&str| {
                    bytes[pos..].starts_with(cand.as_bytes())
                        && bytes[pos + cand.len()..].starts_with(next.as_bytes())
                };
                let chosen = [c, c.trim(), c.trim_start(), c.trim_end()]
                    .into_iter()
                    .find(|cand| fits(cand))?;
                if !chosen.is_empty() {
                    ranges.push(pos..pos + chosen.len());
                }
                pos += chosen.len();
            }
        }
    }
    (pos == bytes.len()).then_some(ranges)
}

#[cfg(test)]
mod tests;
