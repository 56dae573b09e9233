//! A small Chrome DevTools Protocol client for the web page test: headless Chromium
//! driven over `--remote-debugging-pipe` (JSON messages, each ended by a NUL byte; the
//! browser reads its fd 3 and writes its fd 4, which a shell maps onto the pipes of
//! its stdin and stdout). No WebSocket, no extra crate, no browser download.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary: `EXO_CHROMIUM`, else `chromium` on the `PATH`.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EXO_CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

/// A headless Chromium with one page, closed on drop.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Value>,
    next_id: u64,
    session: String,
    log: PathBuf,
}

impl Browser {
    /// Starts `chromium` with a fresh profile in `profile` (its stderr goes to `log`)
    /// and opens a blank page.
    pub fn launch(chromium: &Path, profile: &Path, log: &Path) -> Browser {
        let args = [
            "--headless=new",
            // root in CI: the sandbox needs user namespaces a container may lack
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--window-size=1280,800",
        ];
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(chromium)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(log).expect("chromium log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for msg in BufReader::new(stdout).split(0) {
                let Ok(bytes) = msg else { break };
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            stdin,
            rx,
            next_id: 0,
            session: String::new(),
            log: log.to_path_buf(),
        };
        let target = b.send("Target.createTarget", json!({"url": "about:blank"}), false);
        let attach = json!({"targetId": target["targetId"], "flatten": true});
        let attached = b.send("Target.attachToTarget", attach, false);
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b
    }

    /// One DevTools call (on the page's session or the browser's); its result.
    fn send(&mut self, method: &str, params: Value, on_page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": &params});
        if on_page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        if let Err(e) = self
            .stdin
            .write_all(&bytes)
            .and_then(|_| self.stdin.flush())
        {
            panic!("{method}: the browser is gone ({e}); {}", self.log_tail());
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.rx.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "{method}: no answer from the browser ({e}); {}",
                    self.log_tail()
                )
            });
            if v["id"] != id {
                continue; // an event, or an answer nobody waits for
            }
            if let Some(err) = v.get("error") {
                panic!("{method} {params}: {err}");
            }
            return v["result"].clone();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("chromium's log ends:\n{tail}")
    }

    /// A call on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, true)
    }

    /// The value of a JavaScript expression on the page (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Value {
        let params = json!({"expression": expr, "returnByValue": true, "awaitPromise": true});
        let r = self.call("Runtime.evaluate", params);
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true; how long that took (panics after `within`).
    pub fn wait_for(&mut self, expr: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        while self.eval(expr) != json!(true) {
            assert!(t0.elapsed() < within, "not true within {within:?}: {expr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        t0.elapsed()
    }

    /// Loads `url` and waits for its load event to have finished.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        let loaded = "document.readyState === 'complete' && \
                      performance.getEntriesByType('navigation')[0]?.loadEventEnd > 0";
        self.wait_for(loaded, Duration::from_secs(30));
    }

    /// Types `text` into the focused element, as an input method would.
    pub fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text}));
    }

    /// Presses and releases Enter.
    pub fn press_enter(&mut self) {
        let key = json!({"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13});
        let mut down = key.clone();
        down["type"] = json!("keyDown");
        down["text"] = json!("\r");
        self.call("Input.dispatchKeyEvent", down);
        let mut up = key;
        up["type"] = json!("keyUp");
        self.call("Input.dispatchKeyEvent", up);
    }

    /// A mouse click in the middle of the element `selector` names.
    pub fn click(&mut self, selector: &str) {
        let expr = format!(
            "(() => {{ const r = document.querySelector({selector:?}).getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        );
        let at = self.eval(&expr);
        let (x, y) = (at[0].as_f64().expect("x"), at[1].as_f64().expect("y"));
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            let e = json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1});
            self.call("Input.dispatchMouseEvent", e);
        }
    }

    /// The page's viewport in CSS pixels; `mobile` emulates a phone.
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        let m = json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile});
        self.call("Emulation.setDeviceMetricsOverride", m);
    }

    /// Saves a PNG of the viewport to `path`; its size in bytes.
    pub fn screenshot(&mut self, path: &Path) -> usize {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("data"))
            .expect("base64");
        std::fs::write(path, &png).expect("write screenshot");
        png.len()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .stdin
            .write_all(b"{\"id\":999999,\"method\":\"Browser.close\"}\0");
        let _ = self.stdin.flush();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
