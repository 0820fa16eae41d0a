//! The `portcullis` binary as a subprocess: one-shot commands
//! ([`portcullis`]) and a running instance whose log the test reads
//! ([`Running`]). Each runs with a clean environment ([`INHERITED`]).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// Bound on a CLI command that should answer at once, and on a start.
pub const QUICK: Duration = Duration::from_secs(20);

/// Proxy settings a developer's shell may carry, and `RUST_LOG` (which
/// would replace the config's log level): none of them reach a subprocess
/// unless a test sets it.
pub const INHERITED: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUEST_METHOD",
    "RUST_LOG",
];

/// Runs `portcullis ARGS` to its end, within `limit`; (exit code, stdout, stderr).
pub fn portcullis(args: &[&str], limit: Duration) -> (i32, String, String) {
    use std::io::Read;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in INHERITED {
        cmd.env_remove(v);
    }
    let mut child = cmd.spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("portcullis {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// `portcullis run` as a subprocess, its stderr collected line by line.
/// Dropping it kills it.
pub struct Running {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `portcullis run --config CONFIG` with `env` added to a clean
    /// environment (see [`INHERITED`]).
    pub fn start(config: &Path, env: &[(&str, String)]) -> Running {
        Running::start_under(&[], config, env)
    }

    /// [`Running::start`], run by `wrapper` (a program and its arguments,
    /// given the portcullis command line after them: `faketime`,
    /// `unshare`); no wrapper runs portcullis itself.
    pub fn start_under(wrapper: &[&str], config: &Path, env: &[(&str, String)]) -> Running {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for v in INHERITED {
            cmd.env_remove(v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Running {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Its process id (a wrapper that `exec`s keeps it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line with every one of `needles`; `Err`
    /// says why not, with the log.
    pub fn wait_log(&mut self, needles: &[&str], limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            if let Some(line) = found {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!(
                    "portcullis exited ({status}) before logging {needles:?}:\n{}",
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no log line with {needles:?} within {limit:?}:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the control socket of `state_dir` answers.
    pub fn wait_control(&mut self, state_dir: &Path) {
        let socket = state_dir.join("control.sock");
        let deadline = Instant::now() + QUICK;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "portcullis exited ({status}) while starting:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no control socket within {QUICK:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for its exit, without signalling it.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status (bounded); the whole log is in
    /// [`Running::log`] afterwards.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = self.wait_exit(QUICK);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
