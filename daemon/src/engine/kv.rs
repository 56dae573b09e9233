//! Prompt caching: which tokens each sequence slot's KV cache still holds, and which
//! slot a new prompt should take.
//!
//! A slot's KV cells are addressed by position and a step attends only to positions
//! up to its own, so a new sequence in a slot keeps the cells of a common prefix and
//! overwrites the rest: reuse is choosing the slot and the first position to prefill.
//! Every stage of a pipeline holds its layers' part of those cells, so the slot and
//! positions of a step's batch descriptor are all a remote stage needs.
//!
//! Reuse keeps answers bit-identical to a fresh prefill (and so to llama.cpp): a prompt
//! chunk's numbers depend on the chunk's length and on ggml's kernel choice for it, so
//! only whole chunks of `chunk` tokens cut where a fresh prefill cuts them (at
//! multiples of `chunk`) are reused, and only where they were computed as such a
//! chunk. Decoded tokens (one-token products) are not: while the engine is idle it
//! recomputes the whole chunks they complete ([`PrefixCache::next_fill`]), so the next
//! turn of a chat finds the previous answer cached too. The chunk holding a prompt's
//! last token is always prefilled (it gives the logits).

/// What one slot holds.
#[derive(Debug, Default, Clone)]
struct Entry {
    /// The tokens at positions `0..tokens.len()` of the slot's KV cells.
    tokens: Vec<i32>,
    /// Positions `0..exact` (whole chunks) hold what a fresh prefill computes.
    exact: usize,
    /// When the slot was last taken or given back ([`PrefixCache::clock`]).
    used: u64,
    /// Running a sequence or a fill step.
    busy: bool,
}

/// A slot taken for a prompt: prefill starts at position `cached`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub slot: usize,
    pub cached: usize,
}

/// A whole chunk of a free slot's tokens to recompute as a prompt chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    pub slot: usize,
    pub pos0: usize,
    pub tokens: Vec<i32>,
}

/// The sequence slots of a pipeline with what their KV cells hold.
#[derive(Debug)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    chunk: usize,
    enabled: bool,
    clock: u64,
}

impl PrefixCache {
    /// `n_slots` empty slots; prompts are prefilled in chunks of `chunk` tokens.
    /// Disabled, slots are still handed out (least recently used first) but nothing
    /// is reused.
    pub fn new(n_slots: usize, chunk: usize, enabled: bool) -> PrefixCache {
        PrefixCache {
            entries: vec![Entry::default(); n_slots],
            chunk: chunk.max(1),
            enabled,
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The positions of `prompt` a fresh prefill computes exactly as `e` holds them.
    fn reusable(&self, e: &Entry, prompt: &[i32]) -> usize {
        if !self.enabled || prompt.is_empty() {
            return 0;
        }
        let common = e.tokens[..e.exact.min(e.tokens.len())]
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // the chunk of the last prompt token is prefilled for its logits
        common.min(prompt.len() - 1) / self.chunk * self.chunk
    }

    /// Takes the free slot holding the longest reusable prefix of `prompt`; with none,
    /// the least recently used free slot (an empty one first). None: all are busy.
    pub fn claim(&mut self, prompt: &[i32]) -> Option<Claim> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.busy)
            .map(|(slot, e)| (self.reusable(e, prompt), slot, e.used))
            // longest prefix, then least recently used (of equals), then lowest slot
            .max_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)).then(b.1.cmp(&a.1)))?;
        let (cached, slot, _) = best;
        let used = self.tick();
        let e = &mut self.entries[slot];
        e.busy = true;
        e.used = used;
        e.tokens.truncate(cached);
        e.exact = cached;
        Some(Claim { slot, cached })
    }

    /// Gives a slot back holding `tokens` at positions `0..`, of which the first
    /// `prefilled` came from prompt chunks cut at multiples of the chunk size.
    pub fn release(&mut self, slot: usize, tokens: Vec<i32>, prefilled: usize) {
        let used = self.tick();
        let chunk = self.chunk;
        if let Some(e) = self.entries.get_mut(slot) {
            e.exact = prefilled.min(tokens.len()) / chunk * chunk;
            e.tokens = tokens;
            e.busy = false;
            e.used = used;
        }
    }

    /// Forgets what every slot holds (a failed step, a stage that lost its cache).
    /// Busy slots stay busy.
    pub fn forget_all(&mut self) {
        for e in &mut self.entries {
            e.tokens.clear();
            e.exact = 0;
        }
    }

    /// The next whole chunk worth recomputing in a free slot (the most recently used
    /// first), marking the slot busy; [`PrefixCache::filled`] gives it back.
    pub fn next_fill(&mut self) -> Option<Fill> {
        if !self.enabled {
            return None;
        }
        let chunk = self.chunk;
        let (slot, e) = self
            .entries
            .iter_mut()
            .enumerate()
            .filter(|(_, e)| !e.busy && e.tokens.len() >= e.exact + chunk)
            .max_by_key(|(_, e)| e.used)?;
        e.busy = true;
        Some(Fill {
            slot,
            pos0: e.exact,
            tokens: e.tokens[e.exact..e.exact + chunk].to_vec(),
        })
    }

    /// Whether [`PrefixCache::next_fill`] has work.
    pub fn has_fill(&self) -> bool {
        self.enabled
            && self
                .entries
                .iter()
                .any(|e| !e.busy && e.tokens.len() >= e.exact + self.chunk)
    }

    /// A fill step came back: `ok`, its chunk is now exact.
    pub fn filled(&mut self, fill: &Fill, ok: bool) {
        if let Some(e) = self.entries.get_mut(fill.slot) {
            e.busy = false;
            if ok && e.exact == fill.pos0 && e.tokens.len() >= fill.pos0 + fill.tokens.len() {
                e.exact = fill.pos0 + fill.tokens.len();
            } else if !ok {
                e.tokens.clear();
                e.exact = 0;
            }
        }
    }

    /// Slots running nothing.
    pub fn n_free(&self) -> usize {
        self.entries.iter().filter(|e| !e.busy).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: i32) -> Vec<i32> {
        (0..n as i32).map(|i| i * 3 + salt).collect()
    }

    #[test]
    fn only_whole_chunks_of_a_fresh_prefill_are_reused() {
        let mut c = PrefixCache::new(2, 4, true);
        let a = c.claim(&toks(10, 0)).expect("slot");
        assert_eq!(a.cached, 0);
        // the prompt's 10 tokens were prefilled in chunks 0..4, 4..8, 8..10; three
        // tokens were decoded after it
        let mut held = toks(10, 0);
        held.extend([7, 8, 9]);
        c.release(a.slot, held.clone(), 10);
        // the next turn: what was held and more; positions 8.. came from a short
        // chunk and from decoding, so 8 are reused
        let mut next = held.clone();
        next.extend([1, 2, 3, 4]);
        let b = c.claim(&next).expect("slot");
        assert_eq!(
            b,
            Claim {
                slot: a.slot,
                cached: 8
            }
        );
        c.release(b.slot, next.clone(), next.len());
        // the same prompt again: its last chunk is prefilled for the logits
        let again = c.claim(&next[..16]).expect("slot");
        assert_eq!(again.cached, 12);
        c.release(again.slot, next[..16].to_vec(), 16);
        let once_more = c.claim(&next[..16]).expect("slot");
        assert_eq!(
            once_more.cached, 12,
            "16 tokens: the chunk 12..16 holds the last"
        );
    }

    #[test]
    fn a_diverging_prompt_reuses_up_to_the_chunk_before_the_difference() {
        let mut c = PrefixCache::new(1, 4, true);
        let a = c.claim(&toks(12, 0)).expect("slot");
        c.release(a.slot, toks(12, 0), 12);
        let mut other = toks(12, 0);
        other[6] = -1;
        assert_eq!(c.claim(&other).expect("slot").cached, 4);
    }

    #[test]
    fn the_longest_prefix_wins_and_else_the_least_recently_used_slot() {
        let mut c = PrefixCache::new(3, 2, true);
        let claims: Vec<Claim> = (0..3)
            .map(|s| c.claim(&toks(6, s)).expect("slot"))
            .collect();
        assert!(c.claim(&toks(6, 9)).is_none(), "all busy");
        for (s, cl) in claims.iter().enumerate() {
            c.release(cl.slot, toks(6, s as i32), 6);
        }
        // slot of salt 1 holds it
        let hit = c.claim(&toks(6, 1)).expect("slot");
        assert_eq!((hit.slot, hit.cached), (claims[1].slot, 4));
        // no match: the least recently given back (salt 0's slot)
        let miss = c.claim(&toks(6, 5)).expect("slot");
        assert_eq!((miss.slot, miss.cached), (claims[0].slot, 0));
    }

    #[test]
    fn decoded_tokens_become_reusable_once_filled() {
        let mut c = PrefixCache::new(1, 4, true);
        let a = c.claim(&toks(5, 0)).expect("slot");
        let mut held = toks(5, 0);
        held.extend([40, 41, 42, 43, 44]);
        c.release(a.slot, held.clone(), 5);
        assert!(c.has_fill());
        let f = c.next_fill().expect("fill");
        assert_eq!(
            (f.slot, f.pos0, f.tokens.clone()),
            (a.slot, 4, held[4..8].to_vec())
        );
        assert!(!c.has_fill(), "the slot is busy while its fill runs");
        c.filled(&f, true);
        assert!(!c.has_fill(), "8..10 is not a whole chunk");
        let mut next = held.clone();
        next.extend([1, 2]);
        assert_eq!(c.claim(&next).expect("slot").cached, 8);
    }

    #[test]
    fn disabled_or_forgotten_nothing_is_reused() {
        let mut off = PrefixCache::new(1, 2, false);
        let a = off.claim(&toks(8, 0)).expect("slot");
        off.release(a.slot, toks(8, 0), 8);
        assert_eq!(off.claim(&toks(8, 0)).expect("slot").cached, 0);
        assert!(off.next_fill().is_none());
        let mut on = PrefixCache::new(1, 2, true);
        let a = on.claim(&toks(8, 0)).expect("slot");
        on.release(a.slot, toks(8, 0), 8);
        on.forget_all();
        assert_eq!(on.claim(&toks(8, 0)).expect("slot").cached, 0);
    }
}
