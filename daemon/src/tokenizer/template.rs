//! The chat template: code from the model file, rendered with minijinja under limits.
//!
//! Fuel bounds the steps a render takes and [`BoundedOutput`] what it writes. Neither
//! bounds what it builds in memory: a string doubled in a loop is a terabyte after
//! forty steps, and `replace` can square one. So the `exo` binary renders in a child
//! process of itself ([`sandbox`]) whose data segment is capped for each render: a
//! template that needs more ends that process, the request gets a clear error, and
//! the next render starts a new one. Without [`sandbox::enable`] (the library's own
//! tests, the fuzz targets) renders run in the calling process.

pub mod sandbox;

use std::borrow::Cow;

use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use super::{Message, TokenizerError};

/// One render: the template, the messages and the special tokens' texts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job<'a> {
    pub source: Cow<'a, str>,
    pub messages: Cow<'a, [Message]>,
    pub bos_token: String,
    pub eos_token: String,
}

/// Renders `job`, ending with the assistant's turn: in the sandbox process when this
/// process set one up, else here.
pub fn render(job: &Job<'_>) -> Result<String, TokenizerError> {
    match sandbox::get() {
        Some(s) => s.render(job),
        None => render_here(job),
    }
}

/// Renders `job` in this process, within its [`TemplateLimits`].
pub fn render_here(job: &Job<'_>) -> Result<String, TokenizerError> {
    let limits = TemplateLimits::for_messages(&job.messages);
    let mut env = Environment::new();
    env.set_fuel(Some(limits.fuel));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", &job.source)
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let mut out = BoundedOutput::new(limits.output_bytes);
    let rendered = tmpl.render_captured_to(
        context! {
            messages => job.messages.as_ref(),
            add_generation_prompt => true,
            bos_token => &job.bos_token,
            eos_token => &job.eos_token,
        },
        &mut out,
    );
    match rendered {
        Ok(_) => String::from_utf8(out.bytes)
            .map_err(|_| TokenizerError::Template("the output is not UTF-8".into())),
        Err(_) if out.overflowed => Err(TokenizerError::TemplateTooCostly(format!(
            "its output passed {} bytes, the most it may write for these messages",
            limits.output_bytes
        ))),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
            Err(TokenizerError::TemplateTooCostly(format!(
                "it took more than {} steps, the most it may take for these messages",
                limits.fuel
            )))
        }
        Err(e) => Err(TokenizerError::Template(e.to_string())),
    }
}

/// What one render of a chat template may cost. The template is code from the model file:
/// without bounds a loop in it costs seconds of CPU or gigabytes of output per request.
/// Real templates take a few hundred steps per message and write the messages once,
/// plus their markers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TemplateLimits {
    /// minijinja's fuel: instructions executed.
    fuel: u64,
    output_bytes: usize,
}

impl TemplateLimits {
    const FUEL_BASE: u64 = 1_000_000;
    const FUEL_PER_MESSAGE: u64 = 20_000;
    const OUTPUT_BASE: usize = 64 << 10;
    const OUTPUT_PER_MESSAGE: usize = 1 << 10;

    fn for_messages(messages: &[Message]) -> TemplateLimits {
        let n = messages.len();
        let content: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        TemplateLimits {
            fuel: Self::FUEL_BASE.saturating_add(Self::FUEL_PER_MESSAGE.saturating_mul(n as u64)),
            // a template may repeat a message (a system prompt) but not without end
            output_bytes: Self::OUTPUT_BASE
                .saturating_add(content.saturating_mul(4))
                .saturating_add(Self::OUTPUT_PER_MESSAGE.saturating_mul(n)),
        }
    }
}

/// A `Write` into memory that refuses to grow past a limit.
struct BoundedOutput {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl BoundedOutput {
    fn new(limit: usize) -> BoundedOutput {
        BoundedOutput {
            bytes: Vec::new(),
            limit,
            overflowed: false,
        }
    }
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
