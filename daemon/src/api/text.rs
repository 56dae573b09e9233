//! Turning generated token bytes into text for clients: whole UTF-8 characters only,
//! and stop strings cut out (never emitted, even in part, while streaming).

/// Incremental text with stop-string detection.
#[derive(Debug, Default)]
pub struct TextStream {
    /// Bytes of an incomplete UTF-8 character.
    pending: Vec<u8>,
    /// Text held back because it may be the start of a stop string.
    held: String,
    stops: Vec<String>,
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> TextStream {
        TextStream {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..TextStream::default()
        }
    }

    /// Whether a stop string has been seen (nothing more will be emitted).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token's bytes; returns the text that is now safe to emit.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                // invalid bytes (not just incomplete): replace them and move on
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.held.push_str(&s);
                return self.release();
            }
            Err(e) => e.valid_up_to(),
        };
        let chunk: Vec<u8> = self.pending.drain(..valid).collect();
        self.held.push_str(&String::from_utf8_lossy(&chunk));
        self.release()
    }

    fn release(&mut self) -> String {
        // a complete stop string: emit what precedes it and stop
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..pos].to_string();
            self.held.clear();
            self.pending.clear();
            return out;
        }
        // hold back the longest tail that could still grow into a stop string
        let mut keep = 0;
        for s in &self.stops {
            // every proper prefix of `s` (char boundaries after the first character)
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.held.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// The rest of the text at the end of generation.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let mut out = std::mem::take(&mut self.held);
        out.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out.push_str(&t.push(p.as_bytes()));
            if t.stopped() {
                break;
            }
        }
        out.push_str(&t.finish());
        (out, t.stopped())
    }

    #[test]
    fn text_passes_through_without_stops() {
        assert_eq!(
            run(&[], &["Hel", "lo", " world"]),
            ("Hello world".into(), false)
        );
    }

    #[test]
    fn stop_string_is_never_emitted_even_across_pieces() {
        assert_eq!(
            run(&["\n\n"], &["one", "\n", "\ntwo"]),
            ("one".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn partial_stop_prefix_is_released_when_it_does_not_complete() {
        let mut t = TextStream::new(vec!["STOP".into()]);
        assert_eq!(t.push(b"a ST"), "a ");
        assert_eq!(t.push(b"ART"), "START");
        assert!(!t.stopped());
    }

    #[test]
    fn multibyte_characters_are_emitted_whole() {
        let mut t = TextStream::new(vec![]);
        let e = "é".as_bytes();
        assert_eq!(t.push(&e[..1]), "");
        assert_eq!(t.push(&e[1..]), "é");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }
}
