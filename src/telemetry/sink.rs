//! The audit output (spec §7): a bounded queue and the writer thread that serializes, scrubs and
//! writes one JSON line per event.
//!
//! Writing happens off the request path: when the queue is full the event is dropped, counted in
//! `portcullis_audit_events_dropped_total` and reported in the log — traffic never stalls on a
//! slow disk. A write the output refuses (disk full, a closed pipe) is counted in
//! `portcullis_audit_write_errors_total` and logged once per run of failures.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::AuditOutput;
use crate::credentials::Echoes;
use crate::telemetry::event::{Event, EventLine};
use crate::telemetry::mask::{Masker, HIDDEN};

/// Events the queue holds before dropping.
const QUEUE_EVENTS: usize = 65_536;

enum Message {
    Event(Box<Event>, Arc<Masker>, Vec<Arc<Echoes>>),
    Reopen(AuditOutput),
    Shutdown,
}

/// Opening the audit output failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit output {path}: {reason}")]
pub struct AuditError {
    path: String,
    reason: String,
}

/// The audit queue and its writer thread.
pub struct AuditSink {
    tx: SyncSender<Message>,
    dropped: prometheus::IntCounter,
    last_drop_warning: AtomicU64,
    started: Instant,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink").finish_non_exhaustive()
    }
}

type Output = BufWriter<Box<dyn Write + Send>>;

fn open(output: &AuditOutput) -> Result<Output, AuditError> {
    let sink: Box<dyn Write + Send> = match output {
        AuditOutput::Stdout => Box::new(std::io::stdout()),
        AuditOutput::Stderr => Box::new(std::io::stderr()),
        AuditOutput::File(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| AuditError {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?,
            )
        }
    };
    Ok(BufWriter::with_capacity(64 * 1024, sink))
}

impl AuditSink {
    /// Opens `output` and starts the writer thread.
    /// `dropped` counts events the full queue dropped, `write_errors` writes the output failed.
    pub fn start(
        output: &AuditOutput,
        dropped: prometheus::IntCounter,
        write_errors: prometheus::IntCounter,
    ) -> Result<Self, AuditError> {
        let out = open(output)?;
        let (tx, rx) = sync_channel(QUEUE_EVENTS);
        let writer = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || {
                write_loop(
                    Writer {
                        out,
                        errors: write_errors,
                        failing: false,
                    },
                    rx,
                )
            })
            .map_err(|e| AuditError {
                path: "audit writer thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            tx,
            dropped,
            last_drop_warning: AtomicU64::new(0),
            started: Instant::now(),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues an event; never blocks. A full queue drops it, counts it and says so in the log
    /// (at most once every ten seconds).
    pub fn emit(&self, event: Event, masker: &Arc<Masker>) {
        self.emit_scrubbed(event, masker, Vec::new());
    }

    /// Queues `event`, with `runtime` (secrets no snapshot's masker knows: minted tokens, a
    /// client's OIDC token) scrubbed from its line as well.
    pub fn emit_scrubbed(&self, event: Event, masker: &Arc<Masker>, runtime: Vec<Arc<Echoes>>) {
        match self
            .tx
            .try_send(Message::Event(Box::new(event), masker.clone(), runtime))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                let now = self.started.elapsed().as_secs();
                let last = self.last_drop_warning.load(Ordering::Relaxed);
                if now >= last + 10
                    && self
                        .last_drop_warning
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        dropped_total = self.dropped.get(),
                        "audit queue full: events are being dropped (see portcullis_audit_events_dropped_total)"
                    );
                }
            }
        }
    }

    /// Reopens the output (after log rotation, or a changed `audit.output`).
    pub fn reopen(&self, output: AuditOutput) {
        // Blocking send: a reopen must not be lost, and it is not on a request path.
        let _ = self.tx.send(Message::Reopen(output));
    }

    /// Writes what is queued, flushes and stops the writer.
    pub fn close(&self) {
        let _ = self.tx.send(Message::Shutdown);
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// While events keep coming, the writer naps this long between batches instead of blocking on
/// the queue: a blocked receiver must be woken (a futex call and a context switch) for every
/// event, which at tens of thousands of events a second costs more than writing them.
const BATCH_NAP: std::time::Duration = std::time::Duration::from_millis(5);

/// The output and the counter its failures go to.
struct Writer {
    out: Output,
    errors: prometheus::IntCounter,
    /// Whether the last write failed: a run of failures is logged once, and every one counted.
    failing: bool,
}

impl Writer {
    fn settle(&mut self, result: std::io::Result<()>) {
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.errors.inc();
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        error = %e,
                        "cannot write audit events (see portcullis_audit_write_errors_total)"
                    );
                }
            }
        }
    }

    fn flush(&mut self) {
        let result = self.out.flush();
        self.settle(result);
    }
}

fn write_loop(mut w: Writer, rx: Receiver<Message>) {
    let mut line = String::with_capacity(1024);
    let mut busy = false;
    loop {
        let first = if busy {
            std::thread::sleep(BATCH_NAP);
            rx.try_recv()
                .map_err(|e| e == std::sync::mpsc::TryRecvError::Disconnected)
        } else {
            rx.recv().map_err(|_| true)
        };
        let first = match first {
            Ok(message) => message,
            Err(true) => break,
            Err(false) => {
                busy = false;
                continue;
            }
        };
        busy = true;
        let mut next = Some(first);
        // Take whatever else is queued, then flush once.
        while let Some(message) = next {
            match message {
                Message::Event(event, masker, runtime) => {
                    // One buffer for every line: write, scrub, output.
                    let mut bytes = std::mem::take(&mut line).into_bytes();
                    bytes.clear();
                    EventLine {
                        event: &event,
                        masker: &masker,
                    }
                    .write(&mut bytes);
                    let result = String::from_utf8(bytes)
                        .map_err(std::io::Error::other)
                        .and_then(|text| {
                            line = text;
                            masker.scrub(&mut line);
                            for secret in &runtime {
                                if let Some(scrubbed) = secret.replace_all(&line, HIDDEN) {
                                    line = scrubbed;
                                }
                            }
                            line.push('\n');
                            w.out.write_all(line.as_bytes())
                        });
                    w.settle(result);
                }
                Message::Reopen(output) => {
                    w.flush();
                    match open(&output) {
                        Ok(new) => w.out = new,
                        Err(e) => tracing::error!(error = %e, "audit output not reopened"),
                    }
                }
                Message::Shutdown => {
                    w.flush();
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        w.flush();
    }
    w.flush();
}
