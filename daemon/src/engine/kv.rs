//! Prompt caching: which tokens each sequence slot's KV cache still holds, and which
//! slot a new prompt should take.
//!
//! A slot's KV cells are addressed by position and a step attends only to positions
//! up to its own, so a new sequence in a slot keeps the cells of a common prefix and
//! overwrites the rest: reuse is choosing the slot and the first position to prefill.
//! Every stage of a pipeline holds its layers' part of those cells, so the slot and
//! positions of a step's batch descriptor are all a remote stage needs.
//!
//! Reuse keeps answers bit-identical to a fresh prefill (and so to llama.cpp), which
//! cuts a prompt into chunks of `chunk` tokens at multiples of `chunk`. A token's
//! numbers depend on which of ggml's kernels computes its row of a chunk
//! ([`Granularity`]): a prefix is reused only where a fresh prefill of the new prompt
//! would compute every reused row with the same kernels, and the rest is prefilled
//! from there up to the next multiple of `chunk` as one piece that again computes
//! each row as the fresh chunk would. Decoded tokens (one-token products) are never
//! reused as such: while the engine is idle it recomputes them as a prompt piece
//! ([`PrefixCache::next_fill`]), so the next turn of a chat finds the previous answer
//! cached too. The piece holding a prompt's last token is always prefilled (it gives
//! the logits).

/// Where a prompt chunk's rows may be cut without changing their numbers.
///
/// Read off ggml's CPU kernels (the crate's pinned llama.cpp), and checked bit for
/// bit on the real model by `daemon/tests/prompt_cache.rs`:
/// - repacked weights (Q4_K, Q4_0 on x86; most K-quants on arm64) multiply a chunk's
///   rows in groups of 4 from its first row with `gemm` and the last `len % 4` rows
///   with `gemv`; each row's numbers depend only on which of the two it took (the
///   16-row and 4-row loops of the AVX2/AVX-512 `gemm` do the same float operations
///   per row);
/// - flash attention takes its tiled path for chunks of 64 rows or more (a row's
///   numbers then do not depend on the other rows of its tile), the vector path below;
/// - tiled K-quant products (8 rows or more) and tinyBLAS (2 or more) compute each
///   row alone.
///
/// So a row of a chunk that starts at `s` and holds at least `min_piece` rows gets
/// the same numbers in any such chunk starting at `s + k * group` in which it is not
/// among the last `len % group` rows: a chunk may be computed as consecutive pieces
/// of at least `min_piece` rows cut at its row groups, and a cached prefix reused up
/// to such a cut. arm64 with int8 matrix instructions multiplies
/// plain Q4_0/Q8_0 two rows at a time depending on the thread split: there only
/// whole chunks are reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granularity {
    pub group: usize,
    pub min_piece: usize,
}

impl Granularity {
    /// The cuts ggml's CPU backend allows inside chunks of `chunk` tokens: none when
    /// a chunk is not whole groups or is shorter than a piece.
    pub fn for_chunks(chunk: usize) -> Option<Granularity> {
        Granularity::GGML_CPU.filter(|g| g.fits(chunk))
    }

    /// The last row-group boundary at or before `pos` in the chunk starting at `start`.
    fn floor(&self, start: usize, pos: usize) -> usize {
        start + (pos - start) / self.group * self.group
    }

    fn fits(&self, chunk: usize) -> bool {
        self.group > 0 && chunk.is_multiple_of(self.group) && chunk >= self.min_piece
    }

    /// The length of the next piece of a chunk whose `rest` rows are left: `target`
    /// rows rounded up to a multiple of `min_piece` (so that the rest of a chunk
    /// stays one, and quarter-chunk pieces stay quarters after longer ones), leaving
    /// a rest long enough to be a piece itself, else the whole rest. A chunk
    /// computed as such pieces has the numbers of the chunk computed at once.
    pub fn piece(&self, rest: usize, target: usize) -> usize {
        let piece = target
            .max(1)
            .checked_next_multiple_of(self.min_piece)
            .unwrap_or(usize::MAX);
        if rest >= piece.saturating_add(self.min_piece) {
            piece
        } else {
            rest
        }
    }

    /// ggml's CPU backend as built here.
    pub const GGML_CPU: Option<Granularity> =
        if cfg!(all(target_arch = "aarch64", target_feature = "i8mm")) {
            None
        } else {
            Some(Granularity {
                group: 4,
                min_piece: 64,
            })
        };
}

/// What one slot holds.
#[derive(Debug, Default, Clone)]
struct Entry {
    /// The tokens at positions `0..tokens.len()` of the slot's KV cells.
    tokens: Vec<i32>,
    /// Positions `0..exact` hold what a fresh prefill computes: whole chunks, then
    /// rows of the next chunk that a piece of at least `min_piece` rows computed
    /// outside its last `len % group` ([`Granularity`]).
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

/// A piece of a free slot's tokens to recompute as a prompt chunk.
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
    /// Cuts inside a chunk; None: whole chunks only.
    fine: Option<Granularity>,
    enabled: bool,
    clock: u64,
}

impl PrefixCache {
    /// `n_slots` empty slots; prompts are prefilled in chunks of `chunk` tokens, cut
    /// inside a chunk where ggml's CPU kernels allow it. Disabled, slots are still
    /// handed out (least recently used first) but nothing is reused.
    pub fn new(n_slots: usize, chunk: usize, enabled: bool) -> PrefixCache {
        PrefixCache::with_granularity(n_slots, chunk, enabled, Granularity::GGML_CPU)
    }

    /// As [`PrefixCache::new`] with the given cutting rule (None: whole chunks). A
    /// chunk that is not a multiple of `group`, or shorter than `min_piece`, is only
    /// reused whole.
    pub fn with_granularity(
        n_slots: usize,
        chunk: usize,
        enabled: bool,
        granularity: Option<Granularity>,
    ) -> PrefixCache {
        let chunk = chunk.max(1);
        let fine = granularity.filter(|g| g.fits(chunk));
        PrefixCache {
            entries: vec![Entry::default(); n_slots],
            chunk,
            fine,
            enabled,
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The start of the chunk holding position `pos` of a fresh prefill.
    fn chunk_start(&self, pos: usize) -> usize {
        pos / self.chunk * self.chunk
    }

    /// The positions of `prompt` a fresh prefill computes exactly as `e` holds them,
    /// such that the rest of their chunk is one piece computing each row as the
    /// fresh chunk does.
    fn reusable(&self, e: &Entry, prompt: &[i32]) -> usize {
        if !self.enabled || prompt.is_empty() {
            return 0;
        }
        let common = e.tokens[..e.exact.min(e.tokens.len())]
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // the piece of the last prompt token is prefilled for its logits
        let upto = common.min(prompt.len() - 1);
        let start = self.chunk_start(upto);
        let Some(g) = self.fine else {
            return start;
        };
        // the fresh chunk [start, end) and the piece [cut, end) must both be long
        // enough for the batched kernels, and cut at the fresh chunk's row groups
        let end = (start + self.chunk).min(prompt.len());
        let Some(last_cut) = end.checked_sub(g.min_piece) else {
            return start;
        };
        let cut = upto.min(last_cut);
        if cut <= start {
            return start;
        }
        g.floor(start, cut)
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

    /// The exact prefix after a prompt piece ending at `end`, whose chunk's rows
    /// before the piece were exact: whole chunks, then (cutting finely) the rows of
    /// a piece long enough outside its last `len % group`.
    fn exact_after(&self, end: usize) -> usize {
        let start = self.chunk_start(end);
        match self.fine {
            Some(g) if end - start >= g.min_piece => g.floor(start, end),
            _ => start,
        }
    }

    /// Gives a slot back holding `tokens` at positions `0..`, of which the first
    /// `prefilled` came from prompt pieces, each ending at a multiple of the chunk
    /// size or at `prefilled`.
    pub fn release(&mut self, slot: usize, tokens: Vec<i32>, prefilled: usize) {
        let used = self.tick();
        let exact = self.exact_after(prefilled.min(tokens.len()));
        if let Some(e) = self.entries.get_mut(slot) {
            e.exact = exact;
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

    /// The piece of `e`'s tokens worth recomputing in one step of at most `max_len`
    /// tokens, as positions `pos0..end`: the first part of [`PrefixCache::fill_rest`]
    /// that fits, cut at a row group so that both it and what stays are pieces long
    /// enough (None when no such cut fits).
    fn fill_range(&self, e: &Entry, max_len: usize) -> Option<(usize, usize)> {
        let (from, end) = self.fill_rest(e)?;
        if end - from <= max_len {
            return Some((from, end));
        }
        // a recomputation from the chunk's start (its exact rows too) is done whole
        let g = self.fine.filter(|_| from >= e.exact)?;
        // the piece, and what stays after it, each at least `min_piece` rows
        let cut = max_len.min((end - from).saturating_sub(g.min_piece)) / g.group * g.group;
        (cut >= g.min_piece).then_some((from, from + cut))
    }

    /// What of `e`'s tokens is worth recomputing, as positions `pos0..end`: the
    /// rest of the chunk at its exact prefix, up to the chunk's end or (cutting
    /// finely) up to the last whole group of rows held.
    fn fill_rest(&self, e: &Entry) -> Option<(usize, usize)> {
        if !self.enabled || e.busy {
            return None;
        }
        let start = self.chunk_start(e.exact);
        let held = e.tokens.len();
        let end = if held >= start + self.chunk {
            start + self.chunk
        } else {
            let g = self.fine?;
            g.floor(start, held.max(start))
        };
        if end <= e.exact {
            return None;
        }
        // a whole chunk from its start; else (fine cuts) a piece long enough, from
        // the exact prefix or, to be long enough, from the chunk's start
        let min_piece = self.fine.map_or(usize::MAX, |g| g.min_piece);
        let whole = end == start + self.chunk;
        if e.exact == start && (whole || end - start >= min_piece) {
            Some((start, end))
        } else if end - e.exact >= min_piece {
            Some((e.exact, end))
        } else if end - start >= min_piece {
            Some((start, end))
        } else {
            None
        }
    }

    /// The next piece worth recomputing in a free slot (the most recently used
    /// first), at most `max_len` tokens (a longer rest goes in several pieces),
    /// marking the slot busy; [`PrefixCache::filled`] gives it back.
    pub fn next_fill(&mut self, max_len: usize) -> Option<Fill> {
        let (slot, (pos0, end)) = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(slot, e)| Some((slot, self.fill_range(e, max_len)?, e.used)))
            .max_by_key(|&(_, _, used)| used)
            .map(|(slot, range, _)| (slot, range))?;
        let e = &mut self.entries[slot];
        e.busy = true;
        Some(Fill {
            slot,
            pos0,
            tokens: e.tokens[pos0..end].to_vec(),
        })
    }

    /// Whether [`PrefixCache::next_fill`] has work of at most `max_len` tokens.
    pub fn has_fill(&self, max_len: usize) -> bool {
        self.entries
            .iter()
            .any(|e| self.fill_range(e, max_len).is_some())
    }

    /// A fill step came back: `ok`, its piece is now exact.
    pub fn filled(&mut self, fill: &Fill, ok: bool) {
        if let Some(e) = self.entries.get_mut(fill.slot) {
            e.busy = false;
            let end = fill.pos0 + fill.tokens.len();
            if ok && fill.pos0 <= e.exact && e.tokens.len() >= end {
                e.exact = e.exact.max(end);
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
        assert!(c.has_fill(usize::MAX));
        let f = c.next_fill(usize::MAX).expect("fill");
        assert_eq!(
            (f.slot, f.pos0, f.tokens.clone()),
            (a.slot, 4, held[4..8].to_vec())
        );
        assert!(
            !c.has_fill(usize::MAX),
            "the slot is busy while its fill runs"
        );
        c.filled(&f, true);
        assert!(!c.has_fill(usize::MAX), "8..10 is not a whole chunk");
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
        assert!(off.next_fill(usize::MAX).is_none());
        let mut on = PrefixCache::new(1, 2, true);
        let a = on.claim(&toks(8, 0)).expect("slot");
        on.release(a.slot, toks(8, 0), 8);
        on.forget_all();
        assert_eq!(on.claim(&toks(8, 0)).expect("slot").cached, 0);
    }

    /// Rows in groups of 2, pieces of at least 3 rows, chunks of 8.
    fn fine(n_slots: usize) -> PrefixCache {
        let g = Granularity {
            group: 2,
            min_piece: 3,
        };
        PrefixCache::with_granularity(n_slots, 8, true, Some(g))
    }

    #[test]
    fn fine_cuts_reuse_rows_inside_a_chunk_where_the_rest_is_a_long_enough_piece() {
        let mut c = fine(1);
        let a = c.claim(&toks(13, 0)).expect("slot");
        // chunks 0..8 and 8..13: the last row of the 5-row chunk is its odd one out
        let mut held = toks(13, 0);
        held.extend([90, 91, 92]);
        c.release(a.slot, held.clone(), 13);
        let with = |extra: &[i32]| [&toks(13, 0)[..], extra].concat();
        // 20 tokens: the fresh chunk 8..16, a piece 12..16
        assert_eq!(c.claim(&with(&[1; 7])).expect("slot").cached, 12);
        c.release(0, held.clone(), 13);
        // 14 tokens: the piece 12..14 would be too short, 10..14 is not
        assert_eq!(c.claim(&with(&[1])).expect("slot").cached, 10);
        c.release(0, held.clone(), 13);
        // 10 tokens: the fresh chunk 8..10 is too short to cut
        assert_eq!(c.claim(&toks(10, 0)).expect("slot").cached, 8);
        c.release(0, held.clone(), 13);
        // a difference at 11: rows up to the group before it
        let mut other = with(&[1; 7]);
        other[11] = -1;
        assert_eq!(c.claim(&other).expect("slot").cached, 10);
    }

    #[test]
    fn fine_cuts_recompute_answers_from_the_exact_prefix_or_the_chunk_start() {
        let mut c = fine(1);
        let a = c.claim(&toks(13, 0)).expect("slot");
        let mut held = toks(13, 0);
        held.extend([90, 91, 92, 93, 94]);
        c.release(a.slot, held.clone(), 13);
        // exact up to 12; 18 held: the rest of the chunk, 12..16
        let f = c.next_fill(usize::MAX).expect("fill");
        assert_eq!((f.pos0, f.tokens.clone()), (12, held[12..16].to_vec()));
        c.filled(&f, true);
        // 16..18 is too short a piece, and too short to cut
        assert!(!c.has_fill(usize::MAX));
        let mut next = held.clone();
        next.extend([1, 2, 3, 4]);
        assert_eq!(c.claim(&next).expect("slot").cached, 16);
        // exact up to 12 and 14 held: 12..14 is too short, 8..14 is recomputed
        c.release(0, held[..14].to_vec(), 13);
        let f = c.next_fill(usize::MAX).expect("fill");
        assert_eq!((f.pos0, f.tokens.len()), (8, 6));
        c.filled(&f, true);
        assert!(!c.has_fill(usize::MAX));
    }

    #[test]
    fn a_rest_longer_than_a_fill_step_goes_in_pieces_each_long_enough() {
        let mut c = fine(1);
        let a = c.claim(&toks(2, 0)).expect("slot");
        let mut held = toks(2, 0);
        held.extend([90, 91, 92, 93, 94, 95]);
        c.release(a.slot, held.clone(), 2);
        // the chunk 0..8 is to be recomputed; steps of at most 2 rows cannot hold a
        // piece of 3
        assert!(!c.has_fill(2));
        // at most 5: 0..4 (a group boundary, leaving 4 rows, a piece), then 4..8
        let f = c.next_fill(5).expect("fill");
        assert_eq!((f.pos0, f.tokens.clone()), (0, held[..4].to_vec()));
        c.filled(&f, true);
        let f = c.next_fill(5).expect("fill");
        assert_eq!((f.pos0, f.tokens.clone()), (4, held[4..8].to_vec()));
        c.filled(&f, true);
        assert!(!c.has_fill(usize::MAX));
        let mut next = held.clone();
        next.extend([1, 2, 3, 4]);
        assert_eq!(c.claim(&next).expect("slot").cached, 8);
    }

    #[test]
    fn fine_cuts_need_chunks_of_whole_groups_and_long_enough() {
        for chunk in [5, 2] {
            let g = Granularity {
                group: 2,
                min_piece: 3,
            };
            let mut c = PrefixCache::with_granularity(1, chunk, true, Some(g));
            let a = c.claim(&toks(13, 0)).expect("slot");
            c.release(a.slot, toks(13, 0), 13);
            let mut next = toks(13, 0);
            next.extend([1; 7]);
            assert_eq!(c.claim(&next).expect("slot").cached, 13 / chunk * chunk);
        }
        // ggml's rule at the default batch: a 600-token prompt is exact up to 600
        let mut c = PrefixCache::new(1, 512, true);
        let a = c.claim(&toks(600, 0)).expect("slot");
        c.release(a.slot, toks(600, 0), 600);
        let expect = if Granularity::GGML_CPU.is_some() {
            600
        } else {
            512
        };
        assert_eq!(c.claim(&toks(700, 0)).expect("slot").cached, expect);
    }

    #[test]
    fn a_chunk_goes_in_pieces_of_about_the_target_leaving_a_piece_or_nothing() {
        let g = Granularity {
            group: 4,
            min_piece: 64,
        };
        let pieces = |mut rest: usize, target: usize| {
            let mut out = Vec::new();
            while rest > 0 {
                let n = g.piece(rest, target);
                out.push(n);
                rest -= n;
            }
            out
        };
        // quarter chunks of 512 (next to decoding sequences)
        assert_eq!(pieces(512, 128), [128, 128, 128, 128]);
        assert_eq!(pieces(319, 128), [128, 191]);
        assert_eq!(pieces(320, 128), [128, 128, 64]);
        assert_eq!(pieces(128, 32), [64, 64]);
        assert_eq!(pieces(127, 32), [127]);
        assert_eq!(pieces(40, 128), [40]);
        // a target rounds up to whole minimum pieces; none means one
        assert_eq!(pieces(512, 301), [320, 192]);
        assert_eq!(pieces(512, 65), [128, 128, 128, 128]);
        assert_eq!(pieces(512, 0), [64, 64, 64, 64, 64, 64, 64, 64]);
        // a target of the whole chunk (or more) takes it at once
        assert_eq!(pieces(512, 512), [512]);
        assert_eq!(pieces(512, usize::MAX), [512]);
        // whole minimum pieces are whole row groups
        if let Some(g) = Granularity::GGML_CPU {
            assert_eq!(g.min_piece % g.group, 0);
        }
    }
}
