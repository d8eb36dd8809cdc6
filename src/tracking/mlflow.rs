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

/// A run on a tracking server.
pub struct MlflowRun {
    client: reqwest::Client,
    base: String,
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
    pub async fn start(uri: &str, start: RunStart<'_>) -> anyhow::Result<MlflowRun> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(20))
            .build()?;
        let base = format!("{}/api/2.0/mlflow", uri.trim_end_matches('/'));
        let mut run = MlflowRun {
            client,
            base,
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
        for chunk in start.params.chunks(MAX_PARAMS_PER_BATCH) {
            run.call(
                "runs/log-batch",
                json!({"run_id": run.run_id, "params": key_values(chunk)}),
            )
            .await?;
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
            let url = format!("{}/experiments/get-by-name", self.base);
            let response = self
                .client
                .get(&url)
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
        let url = format!("{}/{endpoint}", self.base);
        let response = self
            .client
            .post(&url)
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
