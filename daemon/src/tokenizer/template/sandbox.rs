//! The template sandbox: a child process of the `exo` binary (`exo template-sandbox`,
//! not listed in the help) that renders chat templates for its parent.
//!
//! The parent sends a [`Job`] and reads a [`Reply`], each as a little-endian `u32`
//! length and JSON, over the child's stdin and stdout. Before each render the child
//! caps its data segment (`RLIMIT_DATA`) at what it uses plus [`MEMORY_BASE`] and
//! [`MEMORY_PER_JOB_BYTE`] per byte of the job: an allocation past that fails, and
//! the child ends (Rust aborts on a failed allocation). The parent then answers
//! [`TokenizerError::TemplateTooCostly`] and starts a new child for the next render. A
//! render that takes longer than [`RENDER_TIMEOUT`] is killed the same way. One child
//! serves the whole process, a render at a time (a render takes well under a
//! millisecond for real templates).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde::{Deserialize, Serialize};

use super::{render_here, Job};
use crate::tokenizer::TokenizerError;

/// Memory a render may take beyond what the sandbox already uses: this much...
pub const MEMORY_BASE: u64 = 64 << 20;
/// ...plus this much per byte of its job (the template and the messages).
pub const MEMORY_PER_JOB_BYTE: u64 = 16;
/// How long one render may take (fuel bounds its steps, but one step can be slow).
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(10);
/// The subcommand that runs the sandbox.
pub const SUBCOMMAND: &str = "template-sandbox";
/// Largest job or reply (a job is bounded by the request body, a reply by the
/// render's output limit).
const MAX_FRAME: usize = 1 << 30;

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// Renders every chat template of this process in a child process running `exe
/// template-sandbox` (`exe` is an `exo` binary: `/proc/self/exe` in `exo` itself, the
/// built one in the fuzz targets and their corpus test). Only the first call counts.
pub fn enable(exe: PathBuf) {
    let _ = SANDBOX.set(Sandbox {
        exe,
        worker: Mutex::new(None),
    });
}

/// The sandbox, when this process set one up.
pub(super) fn get() -> Option<&'static Sandbox> {
    SANDBOX.get()
}

/// What the child answers.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Text(String),
    /// The render failed; `costly` when it passed a limit.
    Refused {
        costly: bool,
        message: String,
    },
}

pub(super) struct Sandbox {
    exe: PathBuf,
    worker: Mutex<Option<Worker>>,
}

/// A running sandbox process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stderr: ChildStderr,
    /// Its replies, read by a thread (so that the wait for one can time out).
    replies: mpsc::Receiver<std::io::Result<Vec<u8>>>,
}

impl Sandbox {
    pub(super) fn render(&self, job: &Job<'_>) -> Result<String, TokenizerError> {
        let bytes = serde_json::to_vec(job).map_err(|e| TokenizerError::Template(e.to_string()))?;
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            *worker = Some(self.spawn()?);
        }
        let Some(w) = worker.as_mut() else {
            return Err(TokenizerError::Template("no sandbox process".into()));
        };
        let reply = write_frame(&mut w.stdin, &bytes)
            .map_err(|e| format!("could not be sent to the sandbox process: {e}"))
            .and_then(|()| match w.replies.recv_timeout(RENDER_TIMEOUT) {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) => Err("ended the sandbox process".to_string()),
                Err(_) => Err(format!("took more than {} s", RENDER_TIMEOUT.as_secs())),
            })
            .and_then(|reply| {
                serde_json::from_slice::<Reply>(&reply).map_err(|e| format!("got a bad reply: {e}"))
            });
        match reply {
            Ok(Reply::Text(text)) => Ok(text),
            Ok(Reply::Refused {
                costly: true,
                message,
            }) => Err(TokenizerError::TemplateTooCostly(message)),
            Ok(Reply::Refused { message, .. }) => Err(TokenizerError::Template(message)),
            Err(mut why) => {
                if let Some(w) = worker.take() {
                    if let Some(last) = w.stop() {
                        why = format!("{why} ({last})");
                    }
                }
                let limit = (MEMORY_BASE + MEMORY_PER_JOB_BYTE * bytes.len() as u64) >> 20;
                Err(TokenizerError::TemplateTooCostly(format!(
                    "rendering it {why}: it may take {limit} MiB of memory for these messages"
                )))
            }
        }
    }

    fn spawn(&self) -> Result<Worker, TokenizerError> {
        let mut child = Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                TokenizerError::Template(format!(
                    "cannot start its sandbox process {}: {e}",
                    self.exe.display()
                ))
            })?;
        let (Some(stdin), Some(mut stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TokenizerError::Template(
                "the sandbox process has no pipes".into(),
            ));
        };
        let (tx, replies) = mpsc::channel();
        std::thread::Builder::new()
            .name("template-sandbox".into())
            .spawn(move || loop {
                let frame = read_frame(&mut stdout).and_then(|f| {
                    f.ok_or_else(|| std::io::Error::other("it ended while rendering"))
                });
                let failed = frame.is_err();
                if tx.send(frame).is_err() || failed {
                    return;
                }
            })
            .map_err(|e| TokenizerError::Template(format!("cannot start a thread: {e}")))?;
        Ok(Worker {
            child,
            stdin,
            stderr,
            replies,
        })
    }
}

impl Worker {
    /// Ends the process; the last line it wrote to stderr (why it ended, as "memory
    /// allocation of 33554432 bytes failed"), if any.
    fn stop(mut self) -> Option<String> {
        let _ = self.child.kill();
        let mut said = Vec::new();
        // nothing is written there but a dying message: the pipe holds all of it
        let _ = (&mut self.stderr).take(4096).read_to_end(&mut said);
        let _ = self.child.wait();
        let said = String::from_utf8_lossy(&said);
        said.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
    }
}

/// The sandbox process: renders the jobs on stdin until it closes, each under its
/// memory cap. Returns on end of input.
pub fn serve() -> std::io::Result<()> {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    while let Some(job) = read_frame(&mut input)? {
        cap_memory(MEMORY_BASE + MEMORY_PER_JOB_BYTE * job.len() as u64)?;
        let reply = match serde_json::from_slice::<Job<'_>>(&job) {
            Err(e) => Reply::Refused {
                costly: false,
                message: format!("bad job: {e}"),
            },
            Ok(job) => match render_here(&job) {
                Ok(text) => Reply::Text(text),
                Err(e @ TokenizerError::TemplateTooCostly(_)) => Reply::Refused {
                    costly: true,
                    message: inner(e),
                },
                Err(e) => Reply::Refused {
                    costly: false,
                    message: inner(e),
                },
            },
        };
        let bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
        write_frame(&mut output, &bytes)?;
    }
    Ok(())
}

/// The message of a template error without its "chat template: " prefix.
fn inner(e: TokenizerError) -> String {
    match e {
        TokenizerError::Template(m) | TokenizerError::TemplateTooCostly(m) => m,
        e => e.to_string(),
    }
}

/// Lets this process's data segment grow by at most `allowance` bytes from now.
fn cap_memory(allowance: u64) -> std::io::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let used_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmData:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no VmData in /proc/self/status"))?;
    let (_, hard) = getrlimit(Resource::RLIMIT_DATA).map_err(std::io::Error::from)?;
    let soft = (used_kib * 1024).saturating_add(allowance).min(hard);
    setrlimit(Resource::RLIMIT_DATA, soft, hard).map_err(std::io::Error::from)
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("frame too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

/// The next frame, or None at the end of input.
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}
