//! What `anng` (the async nng binding) does not offer, on nng's own handles: the
//! receive-size cap of a socket or a listener (`NNG_OPT_RECVMAXSZ`), and a gate that
//! admits at most so many connections to a socket at a time.
//!
//! Handles are nng's numeric ids. nng looks every id up in its own tables, so an id
//! that names nothing (closed, never opened) gives an error, never undefined
//! behaviour; ids must come from sockets opened by `anng` (which initialises nng).
//!
//! The gate's pipe callbacks run on nng's threads. Their argument is the socket's id
//! as an integer, never a pointer: each callback looks its gate up in a registry, so
//! a gate dropped while nng still holds the callback is simply not found.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use nng_sys as sys;

/// An error code of nng, with its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nng {what}: {} (error {code})", message(*code))]
pub struct NngError {
    pub what: &'static str,
    pub code: u32,
}

fn message(code: u32) -> String {
    // SAFETY: nng_strerror returns a static NUL-terminated string for any code.
    let p = unsafe { sys::nng_strerror(sys::nng_err(code)) };
    if p.is_null() {
        return "unknown error".into();
    }
    // SAFETY: p is non-null and points to a NUL-terminated string that nng keeps alive.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn check(what: &'static str, rv: c_int) -> Result<(), NngError> {
    match u32::try_from(rv) {
        Ok(0) => Ok(()),
        Ok(code) => Err(NngError { what, code }),
        Err(_) => Err(NngError {
            what,
            code: u32::MAX,
        }),
    }
}

fn option(name: &'static [u8]) -> *const c_char {
    debug_assert_eq!(name.last(), Some(&0));
    name.as_ptr().cast()
}

fn socket(id: u32) -> sys::nng_socket {
    sys::nng_socket_s {
        _bindgen_opaque_blob: id,
    }
}

fn listener(id: u32) -> sys::nng_listener {
    sys::nng_listener_s {
        _bindgen_opaque_blob: id,
    }
}

/// The protocol number of socket `id` (e.g. 0x51 for PULL, 0x31 for REP).
pub fn socket_protocol(id: u32) -> Result<u16, NngError> {
    let mut proto = 0u16;
    // SAFETY: nng validates the id; `proto` is a valid place for one u16.
    let rv = unsafe { sys::nng_socket_proto_id(socket(id), &mut proto) };
    check("socket protocol", rv).map(|()| proto)
}

/// Caps the messages socket `id` takes at `bytes` (a peer announcing a longer one is
/// disconnected before anything is allocated). Applies to the listeners and dialers
/// added to the socket afterwards.
pub fn set_socket_recv_max(id: u32, bytes: usize) -> Result<(), NngError> {
    // SAFETY: nng validates the id; the option name is a static NUL-terminated string.
    let rv = unsafe { sys::nng_socket_set_size(socket(id), option(sys::NNG_OPT_RECVMAXSZ), bytes) };
    check("setting the receive size", rv)
}

/// Caps the messages listener `id` takes at `bytes`, for the connections it accepts
/// from now on (an accepted connection keeps the cap it was accepted with).
pub fn set_listener_recv_max(id: u32, bytes: usize) -> Result<(), NngError> {
    // SAFETY: nng validates the id; the option name is a static NUL-terminated string.
    let rv =
        unsafe { sys::nng_listener_set_size(listener(id), option(sys::NNG_OPT_RECVMAXSZ), bytes) };
    check("setting the listener's receive size", rv)
}

/// The receive cap of listener `id`.
pub fn listener_recv_max(id: u32) -> Result<usize, NngError> {
    let mut bytes = 0usize;
    // SAFETY: nng validates the id; `bytes` is a valid place for one usize.
    let rv = unsafe {
        sys::nng_listener_get_size(listener(id), option(sys::NNG_OPT_RECVMAXSZ), &mut bytes)
    };
    check("reading the listener's receive size", rv).map(|()| bytes)
}

/// The TCP port listener `id` is bound to.
pub fn listener_port(id: u32) -> Result<u16, NngError> {
    let mut port: c_int = 0;
    // SAFETY: nng validates the id; `port` is a valid place for one int.
    let rv = unsafe {
        sys::nng_listener_get_int(listener(id), option(sys::NNG_OPT_BOUND_PORT), &mut port)
    };
    check("reading the listener's port", rv)?;
    u16::try_from(port).map_err(|_| NngError {
        what: "listener port",
        code: u32::MAX,
    })
}

/// A connection the gate turned away.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The peer's address, as nng prints it ("127.0.0.1:40022").
    pub peer: String,
    /// Connections refused by this gate so far, this one included.
    pub total: u64,
    /// The gate's limit.
    pub max: usize,
}

/// Told of every refusal, on an nng thread (so it must be quick and must not block on
/// nng).
pub type RefusalHook = Box<dyn Fn(&Refusal) + Send + Sync>;

struct GateState {
    /// Every admitted connection (pipe id) with the receive cap it was accepted under.
    pipes: HashMap<u32, usize>,
    /// The cap connections are accepted under now.
    recv_max: usize,
}

struct Gate {
    max_pipes: usize,
    state: Mutex<GateState>,
    refused: AtomicU64,
    hook: RefusalHook,
}

impl Gate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(&self, pipe: sys::nng_pipe, ev: sys::nng_pipe_ev) {
        let id = pipe._bindgen_opaque_blob;
        match ev {
            sys::NNG_PIPE_EV_ADD_PRE => {
                let mut st = self.state();
                if st.pipes.len() < self.max_pipes {
                    let cap = st.recv_max;
                    st.pipes.insert(id, cap);
                    return;
                }
                drop(st);
                let peer = peer_address(pipe);
                close_pipe(id);
                let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                (self.hook)(&Refusal {
                    peer,
                    total,
                    max: self.max_pipes,
                });
            }
            sys::NNG_PIPE_EV_REM_POST => {
                self.state().pipes.remove(&id);
            }
            _ => {}
        }
    }
}

fn registry() -> MutexGuard<'static, HashMap<u32, Arc<Gate>>> {
    static GATES: OnceLock<Mutex<HashMap<u32, Arc<Gate>>>> = OnceLock::new();
    GATES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

extern "C" fn on_pipe_event(pipe: sys::nng_pipe, ev: sys::nng_pipe_ev, arg: *mut c_void) {
    // the argument is the socket id itself (see `ConnectionGate::install`)
    let socket = arg as usize as u32;
    let gate = registry().get(&socket).cloned();
    if let Some(gate) = gate {
        // a panic must not cross into C
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| gate.event(pipe, ev)));
    }
}

fn close_pipe(id: u32) {
    // SAFETY: nng validates the id (a pipe already gone gives an error, ignored).
    let _ = unsafe {
        sys::nng_pipe_close(sys::nng_pipe_s {
            _bindgen_opaque_blob: id,
        })
    };
}

fn peer_address(pipe: sys::nng_pipe) -> String {
    // SAFETY: nng_sockaddr is a plain C union of integers and byte arrays: all zeros is
    // a valid (unspecified) address.
    let mut sa: sys::nng_sockaddr = unsafe { std::mem::zeroed() };
    // SAFETY: nng validates the pipe id; `sa` is a valid place for one address.
    if unsafe { sys::nng_pipe_peer_addr(pipe, &mut sa) } != sys::nng_err::NNG_OK {
        return "an unknown address".into();
    }
    let mut buf = [0 as c_char; sys::NNG_MAXADDRSTRLEN as usize];
    // SAFETY: `sa` was filled by nng; nng writes at most `buf.len()` bytes, NUL included.
    let p = unsafe { sys::nng_str_sockaddr(&sa, buf.as_mut_ptr(), buf.len()) };
    if p.is_null() {
        return "an unknown address".into();
    }
    // SAFETY: nng returned a NUL-terminated string (in `buf` or static).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn notify(socket_id: u32, ev: sys::nng_pipe_ev, on: bool) -> Result<(), NngError> {
    let cb: sys::nng_pipe_cb = on.then_some(on_pipe_event as _);
    // SAFETY: nng validates the socket id; the callback is a plain function that
    // never unwinds; the argument is an integer, never dereferenced.
    let rv = unsafe {
        sys::nng_pipe_notify(socket(socket_id), ev, cb, socket_id as usize as *mut c_void)
    };
    check("pipe notification", rv.0 as c_int)
}

/// Admits at most `max_pipes` connections to a socket at a time (others are closed as
/// they arrive, before the socket sees them) and records the receive cap each was
/// accepted under, so that a new cap can close the connections accepted under another.
/// Uninstalled when dropped.
pub struct ConnectionGate {
    socket: u32,
    gate: Arc<Gate>,
}

impl std::fmt::Debug for ConnectionGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGate")
            .field("socket", &self.socket)
            .field("max_pipes", &self.gate.max_pipes)
            .field("open", &self.open())
            .finish()
    }
}

impl ConnectionGate {
    /// Installs the gate on socket `socket_id`, whose connections are accepted under a
    /// receive cap of `recv_max` bytes; `hook` hears of every refusal. Install it
    /// before the socket listens: connections made earlier are not counted.
    pub fn install(
        socket_id: u32,
        max_pipes: usize,
        recv_max: usize,
        hook: RefusalHook,
    ) -> Result<ConnectionGate, NngError> {
        let gate = Arc::new(Gate {
            max_pipes,
            state: Mutex::new(GateState {
                pipes: HashMap::new(),
                recv_max,
            }),
            refused: AtomicU64::new(0),
            hook,
        });
        registry().insert(socket_id, gate.clone());
        let installed = ConnectionGate {
            socket: socket_id,
            gate,
        };
        // (on an error, dropping `installed` uninstalls what was set)
        notify(socket_id, sys::NNG_PIPE_EV_ADD_PRE, true)?;
        notify(socket_id, sys::NNG_PIPE_EV_REM_POST, true)?;
        Ok(installed)
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        self.gate.state().pipes.len()
    }

    /// Connections admitted under the current receive cap and still open.
    pub fn open_under_current_cap(&self) -> usize {
        let st = self.gate.state();
        st.pipes.values().filter(|&&cap| cap == st.recv_max).count()
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.gate.refused.load(Ordering::Relaxed)
    }

    /// Sets listener `listener_id`'s (of this socket) receive cap to `bytes` and closes
    /// the connections accepted under another cap (their peers' dialers reconnect
    /// under the new one). Returns how many were closed.
    pub fn set_recv_max(&self, listener_id: u32, bytes: usize) -> Result<usize, NngError> {
        let stale: Vec<u32> = {
            let mut st = self.gate.state();
            if st.recv_max == bytes {
                return Ok(0);
            }
            set_listener_recv_max(listener_id, bytes)?;
            st.recv_max = bytes;
            st.pipes
                .iter()
                .filter(|(_, &cap)| cap != bytes)
                .map(|(&id, _)| id)
                .collect()
        };
        // closed outside the lock: their removal events take it
        for &id in &stale {
            close_pipe(id);
        }
        Ok(stale.len())
    }
}

impl Drop for ConnectionGate {
    fn drop(&mut self) {
        // a closed socket refuses these: nothing is left to undo then
        let _ = notify(self.socket, sys::NNG_PIPE_EV_ADD_PRE, false);
        let _ = notify(self.socket, sys::NNG_PIPE_EV_REM_POST, false);
        let mut gates = registry();
        if gates
            .get(&self.socket)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            gates.remove(&self.socket);
        }
    }
}
