//! Sampling: [`argmax`], llama.cpp's [`SamplingParams`] and its common sampler chain.

use std::ptr::NonNull;

use ggml_sys as sys;

use super::{init_backend, len_i32, LlamaError, Result, DEFAULT_SEED};

/// Index of the largest logit, the lowest index on ties; NaNs are skipped. `None` when empty or
/// all NaN.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    // Two vectorisable passes (the maximum, then its first index) beat one branchy
    // pass over a 262k-entry vocabulary by several times. NaN never wins.
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            // `max` ignores NaN operands.
            *a = a.max(v);
        }
    }
    let best = tail
        .iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if best == f32::NEG_INFINITY {
        // all -inf or NaN: the first non-NaN entry, as a plain scan would pick
        return logits.iter().position(|v| !v.is_nan());
    }
    logits.iter().position(|&v| v == best)
}

/// Sampling parameters, with llama.cpp's defaults (`common_params_sampling`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// `<= 0` samples greedily.
    pub temperature: f32,
    /// `<= 0` keeps the whole vocabulary.
    pub top_k: i32,
    /// `1.0` disables.
    pub top_p: f32,
    /// `0.0` disables.
    pub min_p: f32,
    /// `1.0` disables.
    pub repeat_penalty: f32,
    /// Tokens considered by the penalties; `0` disables. llama.cpp's `-1` ("context size") must
    /// be resolved by the caller.
    pub repeat_last_n: i32,
    /// `0.0` disables.
    pub frequency_penalty: f32,
    /// `0.0` disables.
    pub presence_penalty: f32,
    /// [`DEFAULT_SEED`] draws a random seed.
    pub seed: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: DEFAULT_SEED,
        }
    }
}

impl SamplingParams {
    /// Whether sampling reduces to the argmax of the raw logits (no temperature, no
    /// penalties), so no sampler chain is needed.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.repeat_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }

    fn validate(&self) -> Result<()> {
        let floats = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ];
        for (name, v) in floats {
            if !v.is_finite() {
                return Err(LlamaError::InvalidParam(format!(
                    "{name} must be finite, got {v}"
                )));
            }
        }
        if self.repeat_last_n < 0 {
            return Err(LlamaError::InvalidParam(format!(
                "repeat_last_n must be >= 0, got {} (resolve -1 to the context size first)",
                self.repeat_last_n
            )));
        }
        Ok(())
    }
}

/// llama.cpp's sampler chain, built like its common sampler: [logit bias] → penalties → top-k →
/// top-p → min-p → temperature → dist(seed); greedy (penalties → greedy) when temperature <= 0.
pub struct SamplerChain {
    chain: NonNull<sys::llama_sampler>,
    cur: Vec<sys::llama_token_data>,
}

// SAFETY: the chain and its samplers are plain heap objects owned exclusively by this value (no
// thread affinity, no shared state); every call goes through `&mut self` or `&self` getters.
unsafe impl Send for SamplerChain {}

impl std::fmt::Debug for SamplerChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerChain").finish_non_exhaustive()
    }
}

impl SamplerChain {
    /// Builds the chain for `params`.
    pub fn new(params: &SamplingParams) -> Result<SamplerChain> {
        Self::with_logit_bias(params, 0, &[])
    }

    /// The chain for a sequence with `params` whose tokens so far are `history` (its
    /// penalties see them), or `None` for greedy decoding, which is a plain argmax.
    pub fn for_sequence(params: &SamplingParams, history: &[i32]) -> Result<Option<SamplerChain>> {
        if params.is_greedy() {
            return Ok(None);
        }
        let mut chain = SamplerChain::new(params)?;
        for &t in history {
            chain.accept(t);
        }
        Ok(Some(chain))
    }

    /// Like [`SamplerChain::new`], with `(token, bias)` logit biases applied first, as llama.cpp
    /// does for user biases and the model's suppress tokens (bias `f32::NEG_INFINITY`).
    /// `n_vocab` is only used by llama.cpp's GPU "backend sampling" path (never enabled here);
    /// pass the vocabulary size when known, else 0.
    pub fn with_logit_bias(
        params: &SamplingParams,
        n_vocab: i32,
        logit_bias: &[(i32, f32)],
    ) -> Result<SamplerChain> {
        params.validate()?;
        init_backend();
        // SAFETY: returns a plain struct by value.
        let mut chain_params = unsafe { sys::llama_sampler_chain_default_params() };
        chain_params.no_perf = true;
        // SAFETY: takes a plain struct; returns an owned chain (freed in Drop).
        let raw = unsafe { sys::llama_sampler_chain_init(chain_params) };
        let mut this = SamplerChain {
            chain: NonNull::new(raw).ok_or(LlamaError::SamplerInit)?,
            cur: Vec::new(),
        };
        if !logit_bias.is_empty() {
            let biases: Vec<sys::llama_logit_bias> = logit_bias
                .iter()
                .map(|&(token, bias)| sys::llama_logit_bias { token, bias })
                .collect();
            let n = len_i32(biases.len())?;
            // SAFETY: `biases` holds `n` entries for the duration of the call (llama.cpp copies).
            let s = unsafe { sys::llama_sampler_init_logit_bias(n_vocab, n, biases.as_ptr()) };
            this.push(s)?;
        }
        // SAFETY: plain-value arguments; returns an owned sampler (ownership moves to the chain).
        this.push(unsafe {
            sys::llama_sampler_init_penalties(
                n_vocab,
                params.repeat_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        })?;
        if params.temperature <= 0.0 {
            // SAFETY: no arguments; returns an owned sampler.
            this.push(unsafe { sys::llama_sampler_init_greedy() })?;
        } else {
            // SAFETY: plain-value arguments; returns an owned sampler (ownership moves to the chain).
            this.push(unsafe { sys::llama_sampler_init_top_k(params.top_k) })?;
            // SAFETY: as above (min_keep 0 = llama.cpp's default).
            this.push(unsafe { sys::llama_sampler_init_top_p(params.top_p, 0) })?;
            // SAFETY: as above.
            this.push(unsafe { sys::llama_sampler_init_min_p(params.min_p, 0) })?;
            // SAFETY: as above (dynatemp range 0, exponent 1: llama.cpp's defaults).
            this.push(unsafe { sys::llama_sampler_init_temp_ext(params.temperature, 0.0, 1.0) })?;
            // SAFETY: as above.
            this.push(unsafe { sys::llama_sampler_init_dist(params.seed) })?;
        }
        Ok(this)
    }

    fn push(&mut self, sampler: *mut sys::llama_sampler) -> Result<()> {
        if sampler.is_null() {
            return Err(LlamaError::SamplerInit);
        }
        // SAFETY: both pointers are valid; the chain takes ownership of `sampler`.
        unsafe { sys::llama_sampler_chain_add(self.chain.as_ptr(), sampler) };
        Ok(())
    }

    /// Samples a token id from one row of logits (index = token id). Does not accept it: call
    /// [`SamplerChain::accept`] with the token actually used (needed by the penalties).
    pub fn sample(&mut self, logits: &[f32]) -> Result<i32> {
        len_i32(logits.len())?;
        self.sample_candidates(logits.iter().enumerate().map(|(i, &l)| (i as i32, l)))
    }

    /// Samples a token id from candidates `(token id, logit)`: a part of the vocabulary
    /// that contains every token the chain could pick (for instance the union of the best
    /// `k` of every part of a split vocabulary, for a top-k chain without penalties). Does
    /// not accept it.
    pub fn sample_candidates(
        &mut self,
        candidates: impl Iterator<Item = (i32, f32)>,
    ) -> Result<i32> {
        self.cur.clear();
        self.cur
            .extend(candidates.map(|(id, logit)| sys::llama_token_data { id, logit, p: 0.0 }));
        if self.cur.is_empty() {
            return Err(LlamaError::EmptyLogits);
        }
        len_i32(self.cur.len())?;
        if self.cur.iter().any(|d| d.logit.is_nan()) {
            return Err(LlamaError::NanLogits);
        }
        let data = self.cur.as_mut_ptr();
        let mut arr = sys::llama_token_data_array {
            data,
            size: self.cur.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr.data` points to `arr.size` initialised elements of `self.cur`, which is not
        // touched during the call; the samplers sort and shrink the array in place.
        unsafe { sys::llama_sampler_apply(self.chain.as_ptr(), &mut arr) };
        if arr.data != data || arr.size > self.cur.len() {
            return Err(LlamaError::NoSelection);
        }
        let selected = usize::try_from(arr.selected).map_err(|_| LlamaError::NoSelection)?;
        if selected >= arr.size {
            return Err(LlamaError::NoSelection);
        }
        self.cur
            .get(selected)
            .map(|d| d.id)
            .ok_or(LlamaError::NoSelection)
    }

    /// [`SamplerChain::sample`] then [`SamplerChain::accept`].
    pub fn sample_and_accept(&mut self, logits: &[f32]) -> Result<i32> {
        let token = self.sample(logits)?;
        self.accept(token);
        Ok(token)
    }

    /// Records a token as generated (updates the penalties' history).
    pub fn accept(&mut self, token: i32) {
        // SAFETY: the chain is valid; samplers accept any id (the penalties keep a hash map).
        unsafe { sys::llama_sampler_accept(self.chain.as_ptr(), token) };
    }

    /// Forgets the history and re-seeds the RNG (a random seed again for [`DEFAULT_SEED`]).
    pub fn reset(&mut self) {
        // SAFETY: the chain is valid.
        unsafe { sys::llama_sampler_reset(self.chain.as_ptr()) };
    }

    /// The seed in use (the drawn one when [`DEFAULT_SEED`] was asked); [`DEFAULT_SEED`] for a
    /// greedy chain.
    pub fn seed(&self) -> u32 {
        // SAFETY: the chain is valid; this only reads.
        unsafe { sys::llama_sampler_get_seed(self.chain.as_ptr()) }
    }
}

impl Drop for SamplerChain {
    fn drop(&mut self) {
        // SAFETY: the chain came from llama_sampler_chain_init and is freed exactly once; it
        // frees the samplers it owns.
        unsafe { sys::llama_sampler_free(self.chain.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator for test logits (xorshift32).
    struct Rng(u32);

    impl Rng {
        fn next_f32(&mut self) -> f32 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            self.0 = x;
            (x >> 8) as f32 / (1u32 << 24) as f32
        }

        fn logits(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.next_f32() * scale).collect()
        }
    }

    fn greedy_params() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn llama_argmax_lowest_index_on_ties() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn llama_sampler_greedy_is_argmax() {
        let mut chain = SamplerChain::new(&greedy_params()).expect("chain");
        let mut rng = Rng(0x1234_5678);
        for _ in 0..20 {
            let logits = rng.logits(500, 10.0);
            let want = argmax(&logits).expect("non-empty") as i32;
            assert_eq!(chain.sample(&logits).expect("sample"), want);
        }
        // Ties: lowest index.
        let mut logits = vec![0.0f32; 100];
        logits[7] = 5.0;
        logits[42] = 5.0;
        assert_eq!(chain.sample(&logits).expect("sample"), 7);
    }

    #[test]
    fn llama_sampler_rejects_bad_input() {
        let mut chain = SamplerChain::new(&SamplingParams::default()).expect("chain");
        assert!(matches!(chain.sample(&[]), Err(LlamaError::EmptyLogits)));
        assert!(matches!(
            chain.sample(&[1.0, f32::NAN]),
            Err(LlamaError::NanLogits)
        ));
        let bad = SamplingParams {
            top_p: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(SamplerChain::new(&bad).is_err());
        let bad = SamplingParams {
            repeat_last_n: -1,
            ..SamplingParams::default()
        };
        assert!(SamplerChain::new(&bad).is_err());
    }

    fn sample_run(params: &SamplingParams, steps: usize) -> Vec<i32> {
        let mut chain = SamplerChain::new(params).expect("chain");
        let mut rng = Rng(0xdead_beef);
        (0..steps)
            .map(|_| {
                let logits = rng.logits(1000, 1.0);
                chain.sample_and_accept(&logits).expect("sample")
            })
            .collect()
    }

    #[test]
    fn llama_sampler_seed_determinism() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..SamplingParams::default()
        };
        let a = sample_run(&params, 64);
        let b = sample_run(&params, 64);
        assert_eq!(a, b);
        let c = sample_run(&SamplingParams { seed: 43, ..params }, 64);
        assert_ne!(a, c);
        // The default chain (top-k, top-p, min-p) is deterministic too.
        let d = SamplingParams {
            seed: 7,
            ..SamplingParams::default()
        };
        assert_eq!(sample_run(&d, 32), sample_run(&d, 32));
    }

    #[test]
    fn llama_sampler_reset_replays() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 99,
            ..SamplingParams::default()
        };
        let mut chain = SamplerChain::new(&params).expect("chain");
        assert_eq!(chain.seed(), 99);
        let logits = Rng(5).logits(300, 1.0);
        let first: Vec<i32> = (0..16)
            .map(|_| chain.sample(&logits).expect("sample"))
            .collect();
        chain.reset();
        let again: Vec<i32> = (0..16)
            .map(|_| chain.sample(&logits).expect("sample"))
            .collect();
        assert_eq!(first, again);
    }

    #[test]
    fn llama_sampler_penalties_and_bias() {
        let params = SamplingParams {
            repeat_penalty: 100.0,
            ..greedy_params()
        };
        let mut chain = SamplerChain::new(&params).expect("chain");
        let logits = [1.0, 5.0, 4.0];
        assert_eq!(chain.sample_and_accept(&logits).expect("sample"), 1);
        // Token 1 is now penalised (5 / 100).
        assert_eq!(chain.sample_and_accept(&logits).expect("sample"), 2);
        chain.reset();
        assert_eq!(chain.sample(&logits).expect("sample"), 1);

        let mut biased =
            SamplerChain::with_logit_bias(&greedy_params(), 3, &[(1, f32::NEG_INFINITY)])
                .expect("chain");
        assert_eq!(biased.sample(&logits).expect("sample"), 2);
    }

    #[test]
    fn llama_sampler_top_k_one_is_argmax() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: 3,
            ..SamplingParams::default()
        };
        let mut chain = SamplerChain::new(&params).expect("chain");
        let mut rng = Rng(77);
        for _ in 0..10 {
            let logits = rng.logits(200, 4.0);
            let want = argmax(&logits).expect("non-empty") as i32;
            assert_eq!(chain.sample(&logits).expect("sample"), want);
        }
    }
}
