//! One stage's MLflow run, through the tracking server's REST API
//! (`/api/2.0/mlflow/...`): the experiment named after the pipeline, a run
//! named after the stage instance, its params, its metrics as they come and
//! its outputs' paths as tags.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{json, Value};

use super::points::Point;

/// The REST API's limits on one `log-batch` call.
const MAX_METRICS_PER_BATCH: usize = 1000;
const MAX_PARAMS_PER_BATCH: usize = 100;

/// A tracking server: its address without credentials, and the
/// credentials, from the address's `user:password@` or MLflow's own
/// variables (`MLFLOW_TRACKING_TOKEN`, else `MLFLOW_TRACKING_USERNAME` and
/// `MLFLOW_TRACKING_PASSWORD`). Only [`Server::shown`] is ever printed.
#[derive(Clone)]
pub struct Server {
    base: reqwest::Url,
    auth: Auth,
}

#[derive(Clone)]
enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
}

impl Server {
    pub fn parse(uri: &str) -> anyhow::Result<Server> {
        let mut base = reqwest::Url::parse(uri.trim_end_matches('/'))
            .map_err(|e| anyhow::anyhow!("not a URL ({e})"))?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let auth = if !base.username().is_empty() {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            Auth::Basic(
                decode(base.username()),
                decode(base.password().unwrap_or_default()),
            )
        } else if let Some(token) = env("MLFLOW_TRACKING_TOKEN") {
            Auth::Bearer(token)
        } else if let Some(user) = env("MLFLOW_TRACKING_USERNAME") {
            Auth::Basic(user, env("MLFLOW_TRACKING_PASSWORD").unwrap_or_default())
        } else {
            Auth::None
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        Ok(Server { base, auth })
    }

    /// The address as it may be printed: no credentials.
    pub fn shown(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    fn endpoint(&self, endpoint: &str) -> String {
        format!("{}/api/2.0/mlflow/{endpoint}", self.shown())
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::None => request,
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        }
    }
}

/// A run on a tracking server.
pub struct MlflowRun {
    client: reqwest::Client,
    server: Server,
    run_id: String,
}

/// What a stage's run is created with.
pub struct RunStart<'a> {
    pub experiment: &'a str,
    pub run_name: &'a str,
    pub params: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
}

impl MlflowRun {
    /// Creates the run (and the experiment when it is new) and logs its
    /// params.
    pub async fn start(server: &Server, start: RunStart<'_>) -> anyhow::Result<MlflowRun> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(20))
            .build()?;
        let mut run = MlflowRun {
            client,
            server: server.clone(),
            run_id: String::new(),
        };
        let experiment_id = run.experiment(start.experiment).await?;
        let created = run
            .call(
                "runs/create",
                json!({
                    "experiment_id": experiment_id,
                    "run_name": start.run_name,
                    "start_time": now_ms(),
                    "tags": key_values(&start.tags),
                }),
            )
            .await?;
        run.run_id = created["run"]["info"]["run_id"]
            .as_str()
            .context("runs/create answered no run id")?
            .to_string();
        let params: Vec<(String, String)> = start
            .params
            .into_iter()
            .map(|(k, v)| (k, within_param_limit(v)))
            .collect();
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            let logged = run
                .call(
                    "runs/log-batch",
                    json!({"run_id": run.run_id, "params": key_values(chunk)}),
                )
                .await;
            if let Err(e) = logged {
                // Not left RUNNING for ever in the server's list.
                let _ = run.end(false, &[]).await;
                return Err(e);
            }
        }
        Ok(run)
    }

    /// Logs the points' scalars at their steps.
    pub async fn log(&self, points: &[Point]) -> anyhow::Result<()> {
        let timestamp = now_ms();
        let metrics: Vec<Value> = points
            .iter()
            .flat_map(|p| {
                p.scalars.iter().map(move |(key, value)| {
                    json!({"key": key, "value": value, "timestamp": timestamp, "step": p.step})
                })
            })
            .collect();
        for chunk in metrics.chunks(MAX_METRICS_PER_BATCH) {
            self.call(
                "runs/log-batch",
                json!({"run_id": self.run_id, "metrics": chunk}),
            )
            .await?;
        }
        Ok(())
    }

    /// Tags the run and ends it as `FINISHED` or `FAILED`.
    pub async fn end(&self, finished: bool, tags: &[(String, String)]) -> anyhow::Result<()> {
        if !tags.is_empty() {
            self.call(
                "runs/log-batch",
                json!({"run_id": self.run_id, "tags": key_values(tags)}),
            )
            .await?;
        }
        self.call(
            "runs/update",
            json!({
                "run_id": self.run_id,
                "status": if finished { "FINISHED" } else { "FAILED" },
                "end_time": now_ms(),
            }),
        )
        .await?;
        Ok(())
    }

    /// The id of experiment `name`, created when missing (a stage running
    /// beside this one may create it first).
    async fn experiment(&self, name: &str) -> anyhow::Result<String> {
        for _ in 0..2 {
            let url = self.server.endpoint("experiments/get-by-name");
            let response = self
                .server
                .authorized(self.client.get(&url))
                .query(&[("experiment_name", name)])
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            if response.status().is_success() {
                let body: Value = serde_json::from_slice(&response.bytes().await?)?;
                return body["experiment"]["experiment_id"]
                    .as_str()
                    .map(str::to_string)
                    .context("experiments/get-by-name answered no experiment id");
            }
            match self
                .call("experiments/create", json!({ "name": name }))
                .await
            {
                Ok(created) => {
                    return created["experiment_id"]
                        .as_str()
                        .map(str::to_string)
                        .context("experiments/create answered no experiment id")
                }
                Err(e) if format!("{e:#}").contains("RESOURCE_ALREADY_EXISTS") => continue,
                Err(e) => return Err(e),
            }
        }
        anyhow::bail!("experiment `{name}` neither found nor created")
    }

    /// POSTs `body` to `endpoint`; an error carries the server's answer.
    async fn call(&self, endpoint: &str, body: Value) -> anyhow::Result<Value> {
        let url = self.server.endpoint(endpoint);
        let response = self
            .server
            .authorized(self.client.post(&url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&body)?)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "POST {url}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

/// The longest param value MLflow (2.x on) stores.
const MAX_PARAM_CHARS: usize = 6000;

/// `value`, cut to [`MAX_PARAM_CHARS`] (with `...` at the end) when longer:
/// a long `template` or `principle` would fail the whole batch.
fn within_param_limit(value: String) -> String {
    if value.chars().count() <= MAX_PARAM_CHARS {
        return value;
    }
    let mut cut: String = value.chars().take(MAX_PARAM_CHARS - 3).collect();
    cut.push_str("...");
    cut
}

fn key_values(pairs: &[(String, String)]) -> Vec<Value> {
    pairs
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stage's normalised params as MLflow params: nested objects flattened
/// to dotted names, values as their JSON text (strings as they are).
pub fn flatten_params(params: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    flatten_into("", params, &mut out);
    out
}

fn flatten_into(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (k, v) in fields {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_into(&name, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials in the address are sent, never shown; without them,
    /// MLflow's own variables are read.
    #[test]
    fn credentials_go_in_a_header_not_in_what_is_shown() {
        let server = Server::parse("http://ann:s%40cret@127.0.0.1:5000/").unwrap();
        assert_eq!(server.shown(), "http://127.0.0.1:5000");
        let request = server
            .authorized(reqwest::Client::new().post(server.endpoint("runs/create")))
            .build()
            .unwrap();
        assert_eq!(
            request.url().as_str(),
            "http://127.0.0.1:5000/api/2.0/mlflow/runs/create"
        );
        // base64("ann:s@cret")
        assert_eq!(
            request.headers()[reqwest::header::AUTHORIZATION],
            "Basic YW5uOnNAY3JldA=="
        );
        let plain = Server::parse("http://127.0.0.1:5000").unwrap();
        let request = plain
            .authorized(reqwest::Client::new().get(plain.endpoint("x")))
            .build()
            .unwrap();
        let sent = request.headers().get(reqwest::header::AUTHORIZATION);
        let from_env = ["MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        assert_eq!(sent.is_some(), from_env);
    }

    #[test]
    fn long_param_values_are_cut_to_mlflows_limit() {
        assert_eq!(within_param_limit("short".into()), "short");
        let long = within_param_limit("é".repeat(7000));
        assert_eq!(long.chars().count(), MAX_PARAM_CHARS);
        assert!(long.ends_with("..."));
    }

    #[test]
    fn params_flatten_to_dotted_names() {
        let params = json!({"lr": 0.001, "lora": {"rank": 4}, "template": "t", "layers": [1, 2]});
        assert_eq!(
            flatten_params(&params),
            vec![
                ("layers".to_string(), "[1,2]".to_string()),
                ("lora.rank".to_string(), "4".to_string()),
                ("lr".to_string(), "0.001".to_string()),
                ("template".to_string(), "t".to_string()),
            ]
        );
    }
}
