//! Where remotes are configured: `alignflow.config.yaml` in the project
//! (the current folder or one above it) and `~/.config/alignflow/config.yaml`
//! for the user (`$XDG_CONFIG_HOME` when set); `ALIGNFLOW_CONFIG` names one
//! file instead of both. A project remote overrides a user remote of the
//! same name.
//!
//! Credentials are never written here: a remote names the environment
//! variables that hold them (`credentials_env`), or the usual `AWS_*`
//! variables apply.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use super::error::RemoteError;

/// The project config file's name.
pub const PROJECT_CONFIG: &str = "alignflow.config.yaml";

/// `alignflow.config.yaml`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The remote `run` and `plan` read through when no `--remote` is given.
    #[serde(default)]
    pub remote: Option<String>,
    /// Remotes by name.
    #[serde(default)]
    pub remotes: BTreeMap<String, RemoteConfig>,
}

/// One remote cache.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `s3://bucket/prefix` (with `?endpoint=...&region=...` or `options`),
    /// `file:///shared/folder`, `gs://bucket/prefix`, `az://container/prefix`,
    /// `https://host/path`.
    pub url: String,
    /// Store options (object_store's keys: `endpoint`, `region`,
    /// `allow_http`, `conditional_put` = `etag` | `disabled`, ...). Never
    /// credentials: see `credentials_env`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Store credential keys to the environment variables that hold them,
    /// e.g. `{access_key_id: TEAM_S3_KEY, secret_access_key: TEAM_S3_SECRET}`.
    /// Without it the usual `AWS_*` variables are used.
    #[serde(default)]
    pub credentials_env: BTreeMap<String, String>,
    /// Whether `push` (and `write_back`) may write to this remote.
    #[serde(default = "yes")]
    pub write: bool,
    /// `run` pushes each stage it ran to this remote (needs `write`).
    #[serde(default)]
    pub write_back: bool,
    /// Public keys (`NAME:BASE64`, from `alignflow cache keygen`) whose
    /// signatures make a record trusted. When set, a record without a
    /// signature by one of them is a miss.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// A secret key file (from `alignflow cache keygen`) that signs the
    /// records this machine pushes; relative to the config file.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Transfers at once (objects, and parts of a large object).
    #[serde(default = "default_jobs")]
    pub jobs: usize,
    /// Caps the transfer rate (MB/s, 0: no cap), to leave a shared link
    /// usable.
    #[serde(default)]
    pub max_mbps: f64,
    /// How many times an S3 request that found no server (no connection,
    /// a timeout, a 5xx) is tried again, with backoff, within 3 minutes.
    #[serde(default = "default_retries")]
    pub retries: usize,
}

/// object_store's own default.
fn default_retries() -> usize {
    10
}

fn yes() -> bool {
    true
}

fn default_jobs() -> usize {
    8
}

impl RemoteConfig {
    /// A remote given as a URL on the command line: writable, untrusted
    /// keys, the defaults otherwise. `?jobs=`, `?max_mbps=`, `?retries=`
    /// and `?write=` in the query are alignflow's; the other query keys are
    /// store options.
    pub fn from_url(url: &str) -> Result<RemoteConfig, RemoteError> {
        let mut config = RemoteConfig {
            url: url.to_string(),
            options: BTreeMap::new(),
            credentials_env: BTreeMap::new(),
            write: true,
            write_back: false,
            trusted_keys: Vec::new(),
            signing_key: None,
            jobs: default_jobs(),
            max_mbps: 0.0,
            retries: default_retries(),
        };
        config.take_own_query_keys()?;
        Ok(config)
    }

    /// Moves alignflow's own keys out of the URL's query.
    fn take_own_query_keys(&mut self) -> Result<(), RemoteError> {
        let Ok(mut parsed) = url::Url::parse(&self.url) else {
            return Ok(()); // Reported when the store is opened.
        };
        let mut rest = Vec::new();
        for (k, v) in parsed.query_pairs() {
            let bad = |why: String| RemoteError::Url {
                url: redact(&self.url),
                message: format!("query key `{k}`: {why}"),
            };
            match k.as_ref() {
                "jobs" => self.jobs = v.parse().map_err(|e| bad(format!("{e}")))?,
                "max_mbps" => self.max_mbps = v.parse().map_err(|e| bad(format!("{e}")))?,
                "write" => self.write = v.parse().map_err(|e| bad(format!("{e}")))?,
                "retries" => self.retries = v.parse().map_err(|e| bad(format!("{e}")))?,
                _ => rest.push((k.to_string(), v.to_string())),
            }
        }
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        self.url = parsed.to_string();
        Ok(())
    }
}

/// A remote as resolved for a command: its name (or URL) and settings.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// The config name, or the URL as given (without credentials).
    pub name: String,
    pub config: RemoteConfig,
    /// The file it came from (for messages, and relative key paths).
    pub source: Option<PathBuf>,
}

/// `.../alignflow/config.yaml` under the user's config folder.
fn is_user_config(file: &Path) -> bool {
    file.ends_with("alignflow/config.yaml")
}

/// The config files in force, project last (it overrides the user's).
pub fn config_files(start: &Path) -> Vec<PathBuf> {
    if let Some(one) = std::env::var_os("ALIGNFLOW_CONFIG") {
        return vec![PathBuf::from(one)];
    }
    let mut files = Vec::new();
    let user_dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(dir) = user_dir {
        files.push(dir.join("alignflow").join("config.yaml"));
    }
    if let Some(project) = start
        .ancestors()
        .map(|d| d.join(PROJECT_CONFIG))
        .find(|p| p.is_file())
    {
        files.push(project);
    }
    files
}

/// The default remote's name and the remotes of every config file in
/// force, each with its file.
pub fn load_remotes(
    start: &Path,
) -> Result<(Option<String>, BTreeMap<String, RemoteSpec>), RemoteError> {
    load_files(&config_files(start))
}

/// [`load_remotes`] from these files, later ones overriding earlier ones.
fn load_files(
    files: &[PathBuf],
) -> Result<(Option<String>, BTreeMap<String, RemoteSpec>), RemoteError> {
    let mut default = None;
    let mut remotes = BTreeMap::new();
    for file in files.iter().cloned() {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // Another user's home (a service account with HOME=/root): no
            // user config for this one.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && is_user_config(&file) => {
                tracing::debug!("{}: {e}; no user config", file.display());
                continue;
            }
            Err(source) => return Err(RemoteError::Io { path: file, source }),
        };
        let config: Config = serde_yaml::from_str(&text).map_err(|e| RemoteError::Config {
            path: file.clone(),
            message: e.to_string(),
        })?;
        if config.remote.is_some() {
            default = config.remote;
        }
        for (name, mut remote) in config.remotes {
            remote.take_own_query_keys()?;
            if let Some(key) = remote.signing_key.take() {
                let base = file.parent().unwrap_or(Path::new("."));
                remote.signing_key = Some(base.join(key));
            }
            check(&file, &name, &remote)?;
            let spec = RemoteSpec {
                name: name.clone(),
                config: remote,
                source: Some(file.clone()),
            };
            remotes.insert(name, spec);
        }
    }
    Ok((default, remotes))
}

/// Settings that would leak credentials or make no sense.
fn check(file: &Path, name: &str, remote: &RemoteConfig) -> Result<(), RemoteError> {
    let field = |field: &str, message: String| RemoteError::Config {
        path: file.to_path_buf(),
        message: format!("remote `{name}`, field `{field}`: {message}"),
    };
    for key in remote.options.keys() {
        if is_secret_key(key) {
            return Err(field(
                &format!("options.{key}"),
                "credentials are never written in a config file: name the variable that holds it under `credentials_env`".into(),
            ));
        }
    }
    if remote.write_back && !remote.write {
        return Err(field(
            "write_back",
            "needs `write: true` (the remote is configured read-only)".into(),
        ));
    }
    if remote.jobs == 0 {
        return Err(field("jobs", "must be at least 1".into()));
    }
    Ok(())
}

/// Store option keys that hold secrets (object_store's names for AWS,
/// Azure and GCS: `aws_secret_access_key`, `azure_storage_account_key`,
/// `access_key`, `master_key`, `sas_key`, `bearer_token`, ...).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "access_key",
        "account_key",
        "master_key",
        "private_key",
        "token",
        "password",
        "sas",
        "service_account_key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// `remote` as given on the command line: a configured name, or a URL.
pub fn resolve(remote: &str, start: &Path) -> Result<RemoteSpec, RemoteError> {
    let (_, mut remotes) = load_remotes(start)?;
    if let Some(spec) = remotes.remove(remote) {
        return Ok(spec);
    }
    if remote.contains("://") {
        return Ok(RemoteSpec {
            name: redact(remote),
            config: RemoteConfig::from_url(remote)?,
            source: None,
        });
    }
    let known: Vec<&str> = remotes.keys().map(|s| s.as_str()).collect();
    Err(RemoteError::UnknownRemote {
        name: remote.to_string(),
        known: if known.is_empty() {
            format!("no remote is configured ({PROJECT_CONFIG} or ~/.config/alignflow/config.yaml)")
        } else {
            format!("configured: {}", known.join(", "))
        },
    })
}

/// The default remote (`remote:` in the config), if one is configured.
pub fn default_remote(start: &Path) -> Result<Option<RemoteSpec>, RemoteError> {
    let (default, mut remotes) = load_remotes(start)?;
    match default {
        None => Ok(None),
        Some(name) => match remotes.remove(&name) {
            Some(spec) => Ok(Some(spec)),
            None => resolve(&name, start).map(Some),
        },
    }
}

/// A URL without its user info and secret query values, for messages.
pub fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.split('?').next().unwrap_or(url).to_string();
    };
    let _ = parsed.set_password(None);
    let _ = parsed.set_username("");
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let v = if is_secret_key(&k) {
                "***".to_string()
            } else {
                v.to_string()
            };
            (k.to_string(), v)
        })
        .collect();
    if !pairs.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_remotes_keep_store_options_and_take_their_own() {
        let c = RemoteConfig::from_url(
            "s3://b/p?endpoint=http://127.0.0.1:9000&jobs=3&write=false&max_mbps=2.5",
        )
        .unwrap();
        assert_eq!(c.jobs, 3);
        assert!(!c.write);
        assert_eq!(c.max_mbps, 2.5);
        assert_eq!(c.url, "s3://b/p?endpoint=http%3A%2F%2F127.0.0.1%3A9000");
    }

    #[test]
    fn every_store_credential_key_is_a_secret() {
        for key in [
            "aws_secret_access_key",
            "access_key_id",
            "aws_session_token",
            "azure_storage_account_key",
            "account_key",
            "access_key",
            "azure_storage_master_key",
            "sas_key",
            "azure_client_secret",
            "bearer_token",
            "google_service_account_key",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "region",
            "endpoint",
            "allow_http",
            "conditional_put",
            "account_name",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
        let r = redact("az://c/p?account_name=n&account_key=abc");
        assert!(!r.contains("abc") && r.contains("account_name=n"), "{r}");
    }

    #[test]
    fn redaction_hides_secrets() {
        let r = redact("s3://user:pw@b/p?secret_access_key=abc&region=x");
        assert!(!r.contains("abc") && !r.contains("pw"), "{r}");
        assert!(r.contains("region=x"), "{r}");
    }

    #[test]
    fn a_secret_in_a_config_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(PROJECT_CONFIG);
        std::fs::write(
            &file,
            "remotes:\n  team:\n    url: s3://b\n    options: {secret_access_key: x}\n",
        )
        .unwrap();
        let err = load_files(&[file]).unwrap_err().to_string();
        assert!(err.contains("options.secret_access_key"), "{err}");
        assert!(err.contains("credentials_env"), "{err}");
    }
}
