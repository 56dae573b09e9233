//! Sampling: the one place a sequence's next token is picked from logits, used by
//! the scheduler, `exo run`, and the last stage of a cluster alike. Greedy decoding
//! is a plain argmax (llama.cpp's greedy sampler); anything else is llama.cpp's
//! sampler chain, which has seen the prompt (for its penalties).
//!
//! A request's logit biases are added to the logits before either ([`Sampling`]).
//! The log-probabilities it may ask for are those of the model's own distribution:
//! the log-softmax of the raw logits, before biases, penalties and temperature
//! (vLLM's default), so they do not depend on how a token was chosen: a token forced
//! by a bias shows how likely the model found it.
//!
//! When the output projection (`lm_head`) is split between two nodes, each computes
//! the logits of its rows; the last stage sends its part ([`PartialLogits`]) and the
//! first node merges it with its own ([`TokenSampler::pick_split`]). Parts always
//! carry raw logits: the last stage ranks its candidates by biased logits, the first
//! node adds the biases to everything it merges.

use ggml_shim::llama::{argmax, SamplerChain, SamplingParams};

use super::EngineError;

/// The most candidates a stage sends per row of a split `lm_head` (beyond that it
/// sends all its logits).
pub const MAX_LM_HEAD_CANDIDATES: usize = 256;

/// The most alternatives a request may ask log-probabilities of, per token (OpenAI's
/// limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The most logit biases a request may give.
pub const MAX_LOGIT_BIASES: usize = 1024;

/// The largest bias, either way (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// How one sequence picks its tokens: llama.cpp's sampling parameters, biases added
/// to the logits first, and the log-probabilities reported with each token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub params: SamplingParams,
    /// `(token id, bias)`, by id, each id once ([`Sampling::check`]).
    pub logit_bias: Vec<(i32, f32)>,
    /// None: no log-probabilities; `Some(n)`: the chosen token's and those of the
    /// `n` most likely tokens (at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
}

impl From<SamplingParams> for Sampling {
    fn from(params: SamplingParams) -> Sampling {
        Sampling {
            params,
            ..Sampling::default()
        }
    }
}

impl Sampling {
    /// Why these settings cannot be used with a vocabulary of `n_vocab` tokens:
    /// biases on ids outside it, twice on one id, not sorted, beyond
    /// ±[`MAX_LOGIT_BIAS`] or more than [`MAX_LOGIT_BIASES`] of them; more than
    /// [`MAX_TOP_LOGPROBS`] alternatives.
    pub fn check(&self, n_vocab: usize) -> Result<(), String> {
        if self.logit_bias.len() > MAX_LOGIT_BIASES {
            return Err(format!(
                "logit_bias may hold at most {MAX_LOGIT_BIASES} tokens, got {}",
                self.logit_bias.len()
            ));
        }
        let mut prev = None;
        for &(id, bias) in &self.logit_bias {
            if id < 0 || id as usize >= n_vocab {
                return Err(format!(
                    "logit_bias: token id {id} is outside the vocabulary of {n_vocab}"
                ));
            }
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                return Err(format!(
                    "logit_bias: the bias of token {id} must be between -100 and 100, got {bias}"
                ));
            }
            if prev.is_some_and(|p| p >= id) {
                return Err(format!("logit_bias: token {id} is out of order or twice"));
            }
            prev = Some(id);
        }
        match self.logprobs {
            Some(n) if n > MAX_TOP_LOGPROBS => Err(format!(
                "at most {MAX_TOP_LOGPROBS} top log-probabilities per token, got {n}"
            )),
            _ => Ok(()),
        }
    }

    /// The biases of ids `first..first + len`.
    fn biases_in(&self, first: usize, len: usize) -> &[(i32, f32)] {
        biases_in(&self.logit_bias, first, len)
    }
}

/// The biases (sorted by id) of ids `first..first + len`.
fn biases_in(bias: &[(i32, f32)], first: usize, len: usize) -> &[(i32, f32)] {
    let lo = bias.partition_point(|&(id, _)| (id as i64) < first as i64);
    let hi = bias.partition_point(|&(id, _)| (id as i64) < (first + len) as i64);
    &bias[lo..hi.max(lo)]
}

/// Adds the biases of ids `first..first + row.len()` to a row of logits.
fn add_biases(row: &mut [f32], first: usize, bias: &[(i32, f32)]) {
    for &(id, b) in biases_in(bias, first, row.len()) {
        row[id as usize - first] += b;
    }
}

/// The bias of token `id`, 0 without one.
fn bias_of(bias: &[(i32, f32)], id: i32) -> f32 {
    bias.binary_search_by_key(&id, |&(i, _)| i)
        .map_or(0.0, |k| bias[k].1)
}

/// Log-probabilities of one token of the model's distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's.
    pub logprob: f32,
    /// The most likely tokens' `(id, log-probability)`, most likely first (equal
    /// ones by lower id).
    pub top: Vec<(i32, f32)>,
}

impl TokenLogprobs {
    /// The log-softmax of a whole row of raw logits at `token` and at its `n` best.
    /// NaN logits count as impossible.
    pub fn of_row(row: &[f32], token: i32, n: usize) -> TokenLogprobs {
        let max = row
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| (f64::from(v) - f64::from(max)).exp())
            .sum();
        let lse = f64::from(max) + sum.ln();
        // never above 0, which rounding could otherwise give the best token
        let lp = |v: f32| {
            let l = (f64::from(v) - lse) as f32;
            if l.is_nan() {
                f32::NEG_INFINITY
            } else {
                l.min(0.0)
            }
        };
        let chosen = usize::try_from(token)
            .ok()
            .and_then(|t| row.get(t))
            .map_or(f32::NEG_INFINITY, |&v| lp(v));
        TokenLogprobs {
            logprob: chosen,
            top: top_k(row, n, 0)
                .into_iter()
                .map(|(id, l)| (id, lp(l)))
                .collect(),
        }
    }
}

/// A picked token, with its log-probabilities when the sequence asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub token: i32,
    pub logprobs: Option<TokenLogprobs>,
}

impl Picked {
    pub fn token(token: i32) -> Picked {
        Picked {
            token,
            logprobs: None,
        }
    }
}

/// One sequence's way of picking tokens.
pub struct TokenSampler {
    /// None: greedy.
    chain: Option<SamplerChain>,
    sampling: Sampling,
    /// The merged logits of a split `lm_head` (reused).
    full: Vec<f32>,
    /// A row with the biases added (reused).
    biased: Vec<f32>,
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

/// The next token from a row of (biased) logits: argmax, or the chain's choice
/// (accepted).
fn choose(chain: &mut Option<SamplerChain>, row: &[f32]) -> Result<i32, EngineError> {
    match chain.as_mut() {
        None => argmax(row)
            .map(|i| i as i32)
            .ok_or_else(|| EngineError::Input("empty logits".into())),
        Some(chain) => {
            let t = chain.sample(row)?;
            chain.accept(t);
            Ok(t)
        }
    }
}

impl TokenSampler {
    /// The sampler of a sequence sampled as `sampling` whose tokens so far are
    /// `history`. The biases are taken as [`Sampling::check`] wants them.
    pub fn new(sampling: &Sampling, history: &[i32]) -> Result<TokenSampler, EngineError> {
        Ok(TokenSampler {
            chain: SamplerChain::for_sequence(&sampling.params, history)?,
            sampling: sampling.clone(),
            full: Vec::new(),
            biased: Vec::new(),
        })
    }

    /// The next token from one row of logits (ids `0..logits.len()`).
    pub fn pick(&mut self, logits: &[f32]) -> Result<Picked, EngineError> {
        let bias = self.sampling.biases_in(0, logits.len());
        let token = if bias.is_empty() {
            choose(&mut self.chain, logits)?
        } else {
            self.biased.clear();
            self.biased.extend_from_slice(logits);
            add_biases(&mut self.biased, 0, bias);
            choose(&mut self.chain, &self.biased)?
        };
        Ok(Picked {
            token,
            logprobs: self
                .sampling
                .logprobs
                .map(|n| TokenLogprobs::of_row(logits, token, n)),
        })
    }

    /// The next token of a split `lm_head`: this node's logits `mine` (ids
    /// `0..mine.len()`) and the other stage's `theirs` (ids from `mine.len()` up to
    /// `n_vocab`).
    pub fn pick_split(
        &mut self,
        mine: &[f32],
        theirs: &PartialLogits,
        n_vocab: usize,
    ) -> Result<Picked, EngineError> {
        let rows = mine.len();
        let bad = |why: String| EngineError::Pipeline(format!("head part: {why}"));
        let c = match theirs {
            PartialLogits::Dense { first, logits } => {
                if *first as usize != rows || rows + logits.len() != n_vocab {
                    return Err(bad(format!(
                        "logits for ids {first}..{}, expected {rows}..{n_vocab}",
                        *first as usize + logits.len()
                    )));
                }
                // every logit: merged, it is one whole row
                let mut full = std::mem::take(&mut self.full);
                full.clear();
                full.extend_from_slice(mine);
                full.extend_from_slice(logits);
                let picked = self.pick(&full);
                self.full = full;
                return picked;
            }
            PartialLogits::Top(c) => c,
        };
        if let Some(&(id, _)) = c.iter().find(|(id, _)| (*id as usize) < rows) {
            return Err(bad(format!("candidate {id} belongs to this node's rows")));
        }
        if self.sampling.logprobs.is_some() {
            return Err(bad(
                "log-probabilities need every logit, but only candidates came".into(),
            ));
        }
        let bias = &self.sampling.logit_bias;
        let theirs = c.iter().map(|&(id, l)| (id, l + bias_of(bias, id)));
        let mine_bias = biases_in(bias, 0, rows);
        let mine: &[f32] = if mine_bias.is_empty() {
            mine
        } else {
            self.biased.clear();
            self.biased.extend_from_slice(mine);
            add_biases(&mut self.biased, 0, mine_bias);
            &self.biased
        };
        let Some(chain) = self.chain.as_mut() else {
            // greedy: the better of the two bests; on a tie the lower id, as argmax
            let mine_best = argmax(mine).map(|i| (i as i32, mine[i]));
            let their_best = theirs.reduce(|a, b| {
                if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) {
                    b
                } else {
                    a
                }
            });
            return match (mine_best, their_best) {
                (Some(m), Some(t)) => Ok(Picked::token(if m.1 >= t.1 { m.0 } else { t.0 })),
                (Some(m), None) => Ok(Picked::token(m.0)),
                (None, Some(t)) => Ok(Picked::token(t.0)),
                (None, None) => Err(bad("no logits".into())),
            };
        };
        let t = chain.sample_candidates(
            mine.iter()
                .enumerate()
                .map(|(i, &l)| (i as i32, l))
                .chain(theirs),
        )?;
        chain.accept(t);
        Ok(Picked::token(t))
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
    /// What a stage sends of its rows `first..` (one row of raw logits) for a
    /// sequence sampled as `sampling`: its best candidates by biased logit when those
    /// are enough to sample exactly ([`lm_head_candidates`]), else every logit.
    pub fn of_row(sampling: &Sampling, row: &[f32], first: usize) -> PartialLogits {
        let Some(k) = lm_head_candidates(sampling) else {
            return PartialLogits::Dense {
                first: first as u32,
                logits: row.to_vec(),
            };
        };
        let bias = sampling.biases_in(first, row.len());
        if bias.is_empty() {
            return PartialLogits::Top(top_k(row, k, first));
        }
        let mut biased = row.to_vec();
        add_biases(&mut biased, first, bias);
        PartialLogits::Top(
            top_k(&biased, k, first)
                .into_iter()
                .map(|(id, _)| (id, row[id as usize - first]))
                .collect(),
        )
    }
}

/// How many candidates of its rows a stage holding part of a split `lm_head` must
/// send for `s` to be sampled exactly: `Some(1)` for greedy, `Some(k)` for
/// temperature + top-k sampling with k ≤ [`MAX_LM_HEAD_CANDIDATES`] and no
/// penalties (the global top k is then among the two stages' candidates, biases
/// included); `None`, every logit of its rows, otherwise, and whenever
/// log-probabilities are asked for (they need the whole distribution).
pub fn lm_head_candidates(s: &Sampling) -> Option<usize> {
    let p = &s.params;
    if s.logprobs.is_some() {
        return None;
    }
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

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    fn top_k_params(k: i32) -> SamplingParams {
        SamplingParams {
            temperature: 0.8,
            top_k: k,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 5,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn candidates_are_sent_only_when_sampling_is_exact_with_them() {
        let c = |p: SamplingParams| lm_head_candidates(&Sampling::from(p));
        assert_eq!(c(greedy()), Some(1));
        let top40 = top_k_params(40);
        assert_eq!(c(top40), Some(40));
        let penalised = SamplingParams {
            repeat_penalty: 1.1,
            ..top40
        };
        assert_eq!(c(penalised), None);
        assert_eq!(c(SamplingParams { top_k: 0, ..top40 }), None);
        assert_eq!(
            c(SamplingParams {
                top_k: 100_000,
                ..top40
            }),
            None
        );
        let logprobs = Sampling {
            logprobs: Some(0),
            ..Sampling::from(greedy())
        };
        assert_eq!(
            lm_head_candidates(&logprobs),
            None,
            "logprobs need every logit"
        );
    }

    /// A row of distinct logits, one per id.
    fn row(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 9.0 - 5.0)
            .collect()
    }

    /// Whatever the split of the head and the sampling, the token (and its
    /// log-probabilities) are those of the whole row; biases reach the other side.
    #[test]
    fn a_split_pick_equals_the_whole_row_with_biases_and_logprobs() {
        let row = row(64);
        let best = argmax(&row).expect("argmax") as i32;
        let samplings = [
            Sampling::from(greedy()),
            Sampling {
                logit_bias: vec![(3, 100.0), (best, -100.0)],
                ..Sampling::from(greedy())
            },
            Sampling {
                logit_bias: vec![(best, -100.0), (60, 100.0)],
                logprobs: Some(5),
                ..Sampling::from(greedy())
            },
            Sampling {
                logit_bias: vec![(2, 3.0), (40, 50.0), (41, 49.9)],
                ..Sampling::from(top_k_params(4))
            },
            Sampling {
                logprobs: Some(20),
                ..Sampling::from(top_k_params(4))
            },
        ];
        for sampling in &samplings {
            let mut whole = TokenSampler::new(sampling, &[]).expect("sampler");
            let want: Vec<Picked> = (0..6).map(|_| whole.pick(&row).expect("pick")).collect();
            for split in [1, 3, 30, 41, 63] {
                let (mine, theirs) = row.split_at(split);
                let part = PartialLogits::of_row(sampling, theirs, split);
                let mut s = TokenSampler::new(sampling, &[]).expect("sampler");
                for w in &want {
                    let got = s.pick_split(mine, &part, row.len()).expect("pick");
                    assert_eq!(&got, w, "{sampling:?}, split at {split}");
                }
            }
        }
    }

    #[test]
    fn a_bias_of_100_forces_a_token_and_minus_100_bans_it() {
        let row = row(64);
        let best = argmax(&row).expect("argmax") as i32;
        let worst = row
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i32)
            .expect("min");
        for params in [greedy(), top_k_params(8), SamplingParams::default()] {
            let force = Sampling {
                logit_bias: vec![(worst, 100.0)],
                ..Sampling::from(params)
            };
            let ban = Sampling {
                logit_bias: vec![(best, -100.0)],
                ..Sampling::from(params)
            };
            let (mut f, mut b) = (
                TokenSampler::new(&force, &[]).expect("sampler"),
                TokenSampler::new(&ban, &[]).expect("sampler"),
            );
            for _ in 0..20 {
                assert_eq!(f.pick(&row).expect("pick").token, worst, "{params:?}");
                assert_ne!(b.pick(&row).expect("pick").token, best, "{params:?}");
            }
        }
    }

    /// Log-probabilities are the log-softmax of the raw logits (biases do not change
    /// them), sum to one, and come best first.
    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits() {
        let row = row(300);
        let sampling = Sampling {
            logit_bias: vec![(7, 100.0)],
            logprobs: Some(3),
            ..Sampling::from(greedy())
        };
        let picked = TokenSampler::new(&sampling, &[])
            .expect("sampler")
            .pick(&row)
            .expect("pick");
        assert_eq!(picked.token, 7);
        let lp = picked.logprobs.expect("logprobs");
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        let want = |id: usize| (f64::from(row[id]) - z.ln()) as f32;
        assert!((lp.logprob - want(7)).abs() < 1e-5, "{lp:?}");
        assert_eq!(lp.top.len(), 3);
        for (k, &(id, l)) in lp.top.iter().enumerate() {
            assert_eq!((id, k), (top_k(&row, 3, 0)[k].0, k));
            assert!((l - want(id as usize)).abs() < 1e-5, "{lp:?}");
        }
        let all = TokenLogprobs::of_row(&row, 0, row.len());
        let total: f64 = all.top.iter().map(|&(_, l)| f64::from(l).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(all.top.iter().all(|&(_, l)| l <= 0.0));
    }

    #[test]
    fn sampling_settings_are_checked_against_the_vocabulary() {
        let with = |logit_bias: Vec<(i32, f32)>, logprobs| Sampling {
            logit_bias,
            logprobs,
            ..Sampling::default()
        };
        assert!(with(vec![(0, -100.0), (9, 100.0)], Some(20))
            .check(10)
            .is_ok());
        for bad in [
            with(vec![(10, 1.0)], None),
            with(vec![(-1, 1.0)], None),
            with(vec![(1, 100.5)], None),
            with(vec![(1, f32::NAN)], None),
            with(vec![(2, 1.0), (1, 1.0)], None),
            with(vec![(1, 1.0), (1, 2.0)], None),
            with(vec![], Some(21)),
            with((0..1025).map(|i| (i, 0.0)).collect(), None),
        ] {
            assert!(bad.check(10).is_err(), "{bad:?}");
        }
    }
}
