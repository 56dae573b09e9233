//! Sampling: the one place a sequence's next token is picked from logits, used by
//! the scheduler, `exo run`, and the last stage of a cluster alike. Greedy decoding
//! is a plain argmax (llama.cpp's greedy sampler); anything else is llama.cpp's
//! sampler chain, which has seen the prompt (for its penalties).
//!
//! When the output projection (`lm_head`) is split between two nodes, each computes
//! the logits of its rows; the last stage sends its part ([`PartialLogits`]) and the
//! first node merges it with its own ([`TokenSampler::pick_split`]).

use ggml_shim::llama::{argmax, SamplerChain, SamplingParams};

use super::EngineError;

/// The most candidates a stage sends per row of a split `lm_head` (beyond that it
/// sends all its logits).
pub const MAX_LM_HEAD_CANDIDATES: usize = 256;

/// One sequence's way of picking tokens.
pub struct TokenSampler {
    /// None: greedy.
    chain: Option<SamplerChain>,
    /// The merged logits of a split `lm_head` (reused).
    full: Vec<f32>,
}

impl std::fmt::Debug for TokenSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.chain.is_some() {
            "TokenSampler(chain)"
        } else {
            "TokenSampler(greedy)"
        })
    }
}

impl TokenSampler {
    /// The sampler of a sequence with `params` whose tokens so far are `history`.
    pub fn new(params: &SamplingParams, history: &[i32]) -> Result<TokenSampler, EngineError> {
        Ok(TokenSampler {
            chain: SamplerChain::for_sequence(params, history)?,
            full: Vec::new(),
        })
    }

    /// The next token from one row of logits (ids `0..logits.len()`).
    pub fn pick(&mut self, logits: &[f32]) -> Result<i32, EngineError> {
        match self.chain.as_mut() {
            None => argmax(logits)
                .map(|i| i as i32)
                .ok_or_else(|| EngineError::Input("empty logits".into())),
            Some(chain) => {
                let t = chain.sample(logits)?;
                chain.accept(t);
                Ok(t)
            }
        }
    }

    /// The next token of a split `lm_head`: this node's logits `mine` (ids
    /// `0..mine.len()`) and the other stage's `theirs` (ids from `mine.len()` up to
    /// `n_vocab`).
    pub fn pick_split(
        &mut self,
        mine: &[f32],
        theirs: &PartialLogits,
        n_vocab: usize,
    ) -> Result<i32, EngineError> {
        let rows = mine.len();
        let bad = |why: String| EngineError::Pipeline(format!("head part: {why}"));
        match theirs {
            PartialLogits::Top(c) => {
                if let Some(&(id, _)) = c.iter().find(|(id, _)| (*id as usize) < rows) {
                    return Err(bad(format!("candidate {id} belongs to this node's rows")));
                }
            }
            PartialLogits::Dense { first, logits } => {
                if *first as usize != rows || rows + logits.len() != n_vocab {
                    return Err(bad(format!(
                        "logits for ids {first}..{}, expected {rows}..{n_vocab}",
                        *first as usize + logits.len()
                    )));
                }
            }
        }
        let Some(chain) = self.chain.as_mut() else {
            // greedy: the better of the two bests; on a tie the lower id, as argmax
            let mine_best = argmax(mine).map(|i| (i as i32, mine[i]));
            let their_best = match theirs {
                PartialLogits::Top(c) => c.iter().copied().reduce(|a, b| {
                    if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) {
                        b
                    } else {
                        a
                    }
                }),
                PartialLogits::Dense { first, logits } => {
                    argmax(logits).map(|i| ((*first as usize + i) as i32, logits[i]))
                }
            };
            return match (mine_best, their_best) {
                (Some(m), Some(t)) => Ok(if m.1 >= t.1 { m.0 } else { t.0 }),
                (Some(m), None) => Ok(m.0),
                (None, Some(t)) => Ok(t.0),
                (None, None) => Err(bad("no logits".into())),
            };
        };
        let t = match theirs {
            PartialLogits::Top(c) => chain.sample_candidates(
                mine.iter()
                    .enumerate()
                    .map(|(i, &l)| (i as i32, l))
                    .chain(c.iter().copied()),
            )?,
            PartialLogits::Dense { logits, .. } => {
                self.full.clear();
                self.full.extend_from_slice(mine);
                self.full.extend_from_slice(logits);
                chain.sample(&self.full)?
            }
        };
        chain.accept(t);
        Ok(t)
    }
}

/// One output row's logits from a stage holding part of a split `lm_head`.
#[derive(Debug, Clone, PartialEq)]
pub enum PartialLogits {
    /// The best candidates of the stage's rows, `(token id, logit)`.
    Top(Vec<(i32, f32)>),
    /// Every logit of the stage's rows: ids `first..first + logits.len()`.
    Dense { first: u32, logits: Vec<f32> },
}

impl PartialLogits {
    /// What a stage sends of its rows `first..` (one row of logits) for a sequence
    /// with `params`: its best candidates when those are enough to sample exactly
    /// ([`lm_head_candidates`]), else every logit.
    pub fn of_row(candidates: Option<usize>, row: &[f32], first: usize) -> PartialLogits {
        match candidates {
            Some(k) => PartialLogits::Top(top_k(row, k, first)),
            None => PartialLogits::Dense {
                first: first as u32,
                logits: row.to_vec(),
            },
        }
    }
}

/// How many candidates of its rows a stage holding part of a split `lm_head` must
/// send for `p` to be sampled exactly: `Some(1)` for greedy, `Some(k)` for
/// temperature + top-k sampling with k ≤ [`MAX_LM_HEAD_CANDIDATES`] and no
/// penalties (the global top k is then among the two stages' candidates); `None`,
/// every logit of its rows, otherwise.
pub fn lm_head_candidates(p: &SamplingParams) -> Option<usize> {
    if p.is_greedy() {
        return Some(1);
    }
    let no_penalties =
        p.repeat_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0;
    (p.temperature > 0.0
        && no_penalties
        && p.top_k >= 1
        && p.top_k as usize <= MAX_LM_HEAD_CANDIDATES)
        .then_some(p.top_k as usize)
}

/// The `k` best of a row of logits for ids `first..`, best first; equal logits
/// by lower id (as argmax). NaN never wins. Keeps only `k` candidates (a heap whose
/// top is the worst kept), not the whole row.
pub fn top_k(row: &[f32], k: usize, first: usize) -> Vec<(i32, f32)> {
    let k = k.min(row.len());
    if k == 1 {
        return argmax(row)
            .map(|i| vec![((first + i) as i32, row[i])])
            .unwrap_or_default();
    }
    /// A candidate ordered so that the greater one is the worse: lower logit, or
    /// the same logit and a higher id.
    #[derive(PartialEq)]
    struct Kept {
        id: i32,
        logit: f32,
    }
    impl Eq for Kept {}
    impl PartialOrd for Kept {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Kept {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            other
                .logit
                .total_cmp(&self.logit)
                .then(self.id.cmp(&other.id))
        }
    }
    let mut kept = std::collections::BinaryHeap::with_capacity(k + 1);
    for (i, &logit) in row.iter().enumerate() {
        if logit.is_nan() {
            continue;
        }
        let c = Kept {
            id: (first + i) as i32,
            logit,
        };
        if kept.len() < k {
            kept.push(c);
        } else if kept.peek().is_some_and(|worst| c < *worst) {
            kept.pop();
            kept.push(c);
        }
    }
    // ascending in this order is best first
    kept.into_sorted_vec()
        .into_iter()
        .map(|c| (c.id, c.logit))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_best_with_ids_offset() {
        let row = [0.5f32, 3.0, -1.0, 3.0, f32::NAN, 2.0];
        assert_eq!(top_k(&row, 1, 100), vec![(101, 3.0)]);
        assert_eq!(
            top_k(&row, 3, 100),
            vec![(101, 3.0), (103, 3.0), (105, 2.0)]
        );
        assert_eq!(top_k(&row, 10, 0).len(), 5, "NaN is never a candidate");
        // against sorting the whole row, on ties and a long row
        let long: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 613) as f32 / 7.0).collect();
        let mut all: Vec<(i32, f32)> = long
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as i32 + 9, l))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for k in [2, 40, 256] {
            assert_eq!(top_k(&long, k, 9), all[..k].to_vec(), "k {k}");
        }
    }

    #[test]
    fn candidates_are_sent_only_when_sampling_is_exact_with_them() {
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(lm_head_candidates(&greedy), Some(1));
        let top40 = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(lm_head_candidates(&top40), Some(40));
        let penalised = SamplingParams {
            repeat_penalty: 1.1,
            ..top40
        };
        assert_eq!(lm_head_candidates(&penalised), None);
        let no_top_k = SamplingParams { top_k: 0, ..top40 };
        assert_eq!(lm_head_candidates(&no_top_k), None);
        let huge_k = SamplingParams {
            top_k: 100_000,
            ..top40
        };
        assert_eq!(lm_head_candidates(&huge_k), None);
    }

    #[test]
    fn a_split_greedy_pick_equals_argmax_of_the_whole_row() {
        let row = [0.1f32, 2.0, -3.0, 2.0, 1.5, 2.5, 0.0, 2.5];
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let whole = TokenSampler::new(&greedy, &[]).unwrap().pick(&row).unwrap();
        for split in 1..row.len() {
            let (mine, theirs) = row.split_at(split);
            for part in [
                PartialLogits::of_row(Some(1), theirs, split),
                PartialLogits::of_row(None, theirs, split),
            ] {
                let mut s = TokenSampler::new(&greedy, &[]).unwrap();
                assert_eq!(s.pick_split(mine, &part, row.len()).unwrap(), whole);
            }
        }
    }
}
