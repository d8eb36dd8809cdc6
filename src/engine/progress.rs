//! What a run shows and keeps: progress bars on a terminal (indicatif),
//! plain throttled lines otherwise, and the run log under `cache/logs/`.
//! On a cluster node (`alignflow stage exec`) the same reporter appends the
//! stage's progress and metrics to its `events.jsonl` instead, which the
//! engine tails, and prints the stage's output for the job's log.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::ops::Reporter;
use crate::protocol::WorkerEvent;

/// The run's user interface and log.
pub struct Ui {
    multi: Option<MultiProgress>,
    log: Mutex<Option<File>>,
    log_path: Option<PathBuf>,
    start: Instant,
    quiet: bool,
    /// A node's `events.jsonl` (appended), for the engine to tail.
    events: Option<Mutex<File>>,
}

impl Ui {
    /// Bars when stderr is a terminal (and not `quiet`); the log in `logs_dir`.
    pub fn new(logs_dir: Option<&Path>, pipeline: &str, quiet: bool) -> Ui {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        let (log, log_path) = match logs_dir {
            Some(dir) => {
                let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
                    .to_string()
                    .replace(':', "");
                let path = dir.join(format!("{pipeline}-{stamp}-{}.log", std::process::id()));
                match File::create(&path) {
                    Ok(f) => (Some(f), Some(path)),
                    Err(e) => {
                        tracing::warn!("cannot create run log {}: {e}", path.display());
                        (None, None)
                    }
                }
            }
            None => (None, None),
        };
        Ui {
            multi,
            log: Mutex::new(log),
            log_path,
            start: Instant::now(),
            quiet,
            events: None,
        }
    }

    /// The reporter of `alignflow stage exec` on a node: no bars, lines and
    /// the stage's output on stderr (the job's log), progress and metrics
    /// appended to `events`.
    pub fn for_node(events: &Path) -> std::io::Result<Ui> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(events)?;
        Ok(Ui {
            multi: None,
            log: Mutex::new(None),
            log_path: None,
            start: Instant::now(),
            quiet: false,
            events: Some(Mutex::new(file)),
        })
    }

    /// Appends `event` to the node's `events.jsonl` (one line, one write).
    pub fn event(&self, event: &WorkerEvent) {
        if let Some(f) = &self.events {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(format!("{}\n", event.to_line()).as_bytes());
        }
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// A line for the user (above the bars; not when quiet) and the log.
    pub fn say(&self, line: &str) {
        if self.quiet {
            self.log(line);
            return;
        }
        self.shout(line);
    }

    /// A line for the user even when quiet (failures), and the log.
    pub fn shout(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
        self.log(line);
    }

    /// A line for the log only.
    pub fn log(&self, line: &str) {
        if let Some(f) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(f, "[{:>9.3}s] {line}", self.start.elapsed().as_secs_f64());
        }
    }

    /// The progress reporter of a starting stage.
    pub fn stage(&self, stage: &str) -> StageProgress<'_> {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::no_length());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:.bold} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(stage.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        StageProgress {
            ui: self,
            stage: stage.to_string(),
            bar,
            last_line: Mutex::new(None),
        }
    }
}

/// Progress of one stage: a bar, or a plain line at most every 5 seconds.
pub struct StageProgress<'a> {
    ui: &'a Ui,
    stage: String,
    bar: Option<ProgressBar>,
    last_line: Mutex<Option<Instant>>,
}

impl StageProgress<'_> {
    /// Removes the bar.
    pub fn finish(&self) {
        if let (Some(bar), Some(multi)) = (&self.bar, &self.ui.multi) {
            bar.finish_and_clear();
            multi.remove(bar);
        }
    }

    /// A line of the stage's own output (worker stderr, exec output): log only.
    pub fn output_line(&self, line: &str) {
        if self.ui.events.is_some() {
            eprintln!("{line}");
        }
        self.ui.log(&format!("{}: {line}", self.stage));
    }
}

impl Reporter for StageProgress<'_> {
    fn progress(&self, pos: u64, len: Option<u64>, msg: &str) {
        self.ui.event(&WorkerEvent::Progress {
            pos,
            len,
            msg: msg.to_string(),
        });
        match &self.bar {
            Some(bar) => {
                if let Some(len) = len {
                    bar.set_length(len);
                }
                bar.set_position(pos);
                bar.set_message(msg.to_string());
            }
            None if self.ui.quiet => {}
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
                let done = len.is_some_and(|l| pos >= l);
                if done || last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    *last = Some(Instant::now());
                    let of = len.map(|l| format!("/{l}")).unwrap_or_default();
                    eprintln!("  {} {pos}{of} {msg}", self.stage);
                }
            }
        }
        self.ui.log(&format!(
            "{}: progress {pos}{} {msg}",
            self.stage,
            len.map(|l| format!("/{l}")).unwrap_or_default()
        ));
    }

    fn metric(&self, values: &BTreeMap<String, f64>) {
        self.ui.event(&WorkerEvent::Metric {
            values: values.clone(),
        });
        let text: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v:.6}")).collect();
        self.ui
            .log(&format!("{}: metric {}", self.stage, text.join(" ")));
    }
}
