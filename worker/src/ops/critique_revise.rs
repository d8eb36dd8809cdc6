//! `critique_revise`: K rounds of critique and revision per response, each
//! round one batched generation of all critiques, then one of all revisions
//! (prompt assembly and principle sampling live in `alignflow_ops`).

use anyhow::Context;

use alignflow_ops::data::{read_jsonl, Constitution, CritiqueRevision, JsonlWriter};
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::{apply_template, Tokenizer};
use alignflow_ops::{
    choose_principles, critique_messages, critique_prompt, cut_at_stop, few_shot_messages,
    few_shot_prefix, revision_messages, revision_prompt, ChatFormat, CritiqueReviseParams,
    RevisionRecord, SftRecord, StageContext, TrailStep, STOP_STRINGS,
};
use serde_json::Value;

use super::examples::check_prompt_turns;
use super::load;
use super::sampling::{decode_answer, decoding_config, sample_prompts};
use crate::model::sample::SamplingConfig;
use crate::model::{self, Model};

/// One input record while it is being revised.
struct Item {
    prompt: String,
    conversation: String,
    /// With a chat template: the prompt's turns (without the answer).
    turns: Vec<Value>,
    original: String,
    /// The answer the next round critiques.
    answer: String,
    principles: Vec<usize>,
    trail: Vec<TrailStep>,
}

/// Generates one continuation per text, `batch_size` decoding at once, each
/// cut at the next turn marker. `phase` numbers the calls of a stage so that
/// every call draws from its own seed.
struct Generator<'a> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    /// The stage's chat template, if requests are conversation turns.
    chat: Option<&'a ChatFormat>,
    cfg: SamplingConfig,
    batch_size: usize,
    /// Most prompt tokens (over-long prompts keep their end).
    budget: usize,
    /// The kinds of request already logged as rendered.
    logged: std::cell::RefCell<Vec<&'static str>>,
}

impl Generator<'_> {
    /// The text a request is sampled from: its turns rendered with the
    /// generation prompt when the stage has a chat template, else the plain
    /// text.
    fn request(
        &self,
        what: &'static str,
        plain: impl FnOnce() -> String,
        turns: impl FnOnce() -> Vec<Value>,
    ) -> anyhow::Result<String> {
        match self.chat {
            None => Ok(plain()),
            Some(chat) => {
                let turns = Value::Array(turns());
                let text = chat
                    .prompt(&turns)
                    .map_err(|e| anyhow::anyhow!("{e} ({})", chat.source))?
                    .text;
                let mut logged = self.logged.borrow_mut();
                if !logged.contains(&what) {
                    logged.push(what);
                    super::rendered::log(what, &turns, &text);
                }
                Ok(text)
            }
        }
    }

    fn run(
        &self,
        ctx: &StageContext<'_>,
        texts: &[String],
        phase: u64,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<String>> {
        let mut prompts = Vec::with_capacity(texts.len());
        for text in texts {
            // A rendered template writes its own BOS.
            let mut ids = match self.chat {
                Some(_) => self.tokenizer.encode(text)?,
                None => self.tokenizer.encode_start(text)?,
            };
            let cut = ids.len().saturating_sub(self.budget);
            self.tokenizer.cut_start(&mut ids, cut);
            counts.truncated_prompts += usize::from(cut > 0);
            prompts.push(ids);
        }
        let stop = |_: usize, toks: &[i64]| -> bool {
            self.tokenizer
                .decode(toks)
                .is_ok_and(|t| STOP_STRINGS.iter().any(|s| t.contains(s)))
        };
        // Text `i` of phase `phase` draws from stream `i` of the phase's seed.
        let cfg = SamplingConfig {
            seed: self.cfg.seed ^ splitmix(phase),
            max_rows: self.batch_size,
            ..self.cfg.clone()
        };
        let ids: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
        let sampled = sample_prompts(ctx, &self.model.lm, &ids, 1, &cfg, stop, "generating")?;
        let mut out = Vec::with_capacity(texts.len());
        for sample in &sampled.samples {
            counts.new_tokens += sample.tokens.len();
            out.push(cut_at_stop(&decode_answer(self.tokenizer, sample)?));
        }
        Ok(out)
    }
}

/// A 64-bit mix, so nearby stream numbers give unrelated seeds.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the rounds produced, for the metrics.
#[derive(Default)]
struct Counts {
    new_tokens: usize,
    /// Critique and revision requests that lost their beginning.
    truncated_prompts: usize,
    empty_revisions: usize,
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: CritiqueReviseParams = ctx.params()?;
    let stage = &ctx.spec.stage;
    let constitution = Constitution::load(ctx.input("constitution")?)?;
    let principles = &constitution.critique_revision;
    anyhow::ensure!(
        !principles.is_empty(),
        "stage `{stage}`: the constitution `{}` has no critique/revision principles",
        constitution.name
    );
    let examples: &[String] = if p.few_shot {
        &constitution.few_shot.critique_revision
    } else {
        &[]
    };
    let shots = Shots {
        text: few_shot_prefix(examples),
        turns: few_shot_messages(examples),
    };

    let device = model::device(&ctx.spec.device)?;
    let model_dir = ctx.input("model")?;
    let (tokenizer, model) = load::language_model(model_dir, device, p.dtype)?;
    let chat = load::chat_format(ctx, p.chat_template, model_dir)?;
    let mut items = read_items(ctx, &p, principles.len(), chat.is_some())?;
    let generator = Generator {
        model: &model,
        tokenizer: &tokenizer,
        chat: chat.as_ref(),
        cfg: decoding_config(&tokenizer, &model, &p.decoding, ctx.spec.seed),
        batch_size: p.batch_size.max(1),
        budget: load::prompt_budget(
            &stage,
            model.lm.cfg.max_positions,
            p.decoding.max_new_tokens,
        )?,
        logged: Default::default(),
    };

    let start = std::time::Instant::now();
    let mut counts = Counts::default();
    for round in 0..p.rounds {
        revise_once(
            ctx,
            &generator,
            &mut items,
            principles,
            &shots,
            round,
            &mut counts,
        )?;
        ctx.reporter.progress(
            round as u64 + 1,
            Some(p.rounds as u64),
            "critique/revision rounds",
        );
    }
    write_outputs(ctx, &items, chat.as_ref())?;

    let secs = start.elapsed().as_secs_f64();
    let mut m = Metrics::new();
    m.insert("records".into(), items.len().into());
    m.insert("rounds".into(), p.rounds.into());
    m.insert("new_tokens".into(), counts.new_tokens.into());
    m.insert("truncated_prompts".into(), counts.truncated_prompts.into());
    m.insert("empty_revisions".into(), counts.empty_revisions.into());
    m.insert(
        "tokens_per_s".into(),
        serde_json::json!(counts.new_tokens as f64 / secs.max(1e-9)),
    );
    Ok(m)
}

/// Reads the `responses` input, each record with the principles of its
/// rounds (drawn from `principles` of them, by the record's index).
fn read_items(
    ctx: &StageContext<'_>,
    p: &CritiqueReviseParams,
    principles: usize,
    chat: bool,
) -> anyhow::Result<Vec<Item>> {
    let stage = &ctx.spec.stage;
    let path = ctx.input("responses")?;
    let mut items = Vec::new();
    for (line, record) in read_jsonl::<serde_json::Value>(path)? {
        let record = record
            .map_err(|e| anyhow::anyhow!("stage `{stage}`: {}:{line}: {e}", path.display()))?;
        let field = |name: &str| {
            record[name].as_str().with_context(|| {
                format!(
                    "stage `{stage}`: {}:{line}: no string field `{name}`",
                    path.display()
                )
            })
        };
        let prompt = field("prompt")?.to_string();
        let conversation = match record["prompt_text"].as_str() {
            Some(text) => text.to_string(),
            None => apply_template(&p.template, &prompt),
        };
        let original = field("response")?.to_string();
        let turns = if chat {
            prompt_turns(&record, &apply_template(&p.template, &prompt))
                .map_err(|e| anyhow::anyhow!("stage `{stage}`: {}:{line}: {e}", path.display()))?
        } else {
            Vec::new()
        };
        let index = items.len() as u64;
        items.push(Item {
            prompt,
            conversation,
            turns,
            answer: original.trim().to_string(),
            original,
            principles: choose_principles(ctx.spec.seed, index, principles, p.rounds, p.sampling),
            trail: Vec::new(),
        });
    }
    Ok(items)
}

/// Round `round`: one batched generation of every item's critique, then
/// one of every revision.
fn revise_once(
    ctx: &StageContext<'_>,
    generator: &Generator<'_>,
    items: &mut [Item],
    principles: &[CritiqueRevision],
    shots: &Shots,
    round: usize,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let texts: Vec<String> = items
        .iter()
        .map(|it| {
            let principle = &principles[it.principles[round]];
            generator.request(
                "critique request",
                || critique_prompt(&shots.text, &it.conversation, &it.answer, principle),
                || critique_messages(&shots.turns, &it.turns, &it.answer, principle),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let critiques = generator.run(ctx, &texts, 2 * round as u64, counts)?;
    let texts: Vec<String> = items
        .iter()
        .zip(&critiques)
        .map(|(it, critique)| {
            let principle = &principles[it.principles[round]];
            generator.request(
                "revision request",
                || {
                    revision_prompt(
                        &shots.text,
                        &it.conversation,
                        &it.answer,
                        principle,
                        critique,
                    )
                },
                || revision_messages(&shots.turns, &it.turns, &it.answer, principle, critique),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let revisions = generator.run(ctx, &texts, 2 * round as u64 + 1, counts)?;
    for ((it, critique), revision) in items.iter_mut().zip(critiques).zip(revisions) {
        // An empty revision is recorded in the trail but does not
        // replace the answer: it would be a useless SFT target.
        if revision.is_empty() {
            counts.empty_revisions += 1;
        } else {
            it.answer = revision.clone();
        }
        it.trail.push(TrailStep {
            principle: principles[it.principles[round]].id.clone(),
            critique,
            revision,
        });
    }
    Ok(())
}

/// Writes the `revisions` trail and the `sft` records.
fn write_outputs(
    ctx: &StageContext<'_>,
    items: &[Item],
    chat: Option<&ChatFormat>,
) -> anyhow::Result<()> {
    let mut revisions_out = JsonlWriter::create(&ctx.output("revisions"))?;
    let mut sft_out = JsonlWriter::create(&ctx.output("sft"))?;
    for it in items {
        let (prompt_text, messages) = match chat {
            None => (it.conversation.clone(), None),
            Some(chat) => {
                let turns = Value::Array(it.turns.clone());
                let text = chat
                    .prompt(&turns)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .text;
                let mut with_answer = it.turns.clone();
                with_answer.push(serde_json::json!({"role": "assistant", "content": it.answer}));
                (text, Some(Value::Array(with_answer)))
            }
        };
        sft_out.write(&SftRecord {
            prompt: it.conversation.clone(),
            response: format!(" {}", it.answer),
            messages,
        })?;
        revisions_out.write(&RevisionRecord {
            prompt: it.prompt.clone(),
            prompt_text,
            original: it.original.clone(),
            trail: it.trail.clone(),
            revision: it.answer.clone(),
        })?;
    }
    revisions_out.finish()?;
    sft_out.finish()?;
    Ok(())
}

/// The few-shot examples as plain text and as conversation turns.
struct Shots {
    text: String,
    turns: Vec<Value>,
}

/// A record's prompt turns for the chat template: its `messages` before
/// the answer under review (as `generate` writes them), else `templated`
/// (the prompt through `template`) as one user turn.
fn prompt_turns(record: &Value, templated: &str) -> Result<Vec<Value>, String> {
    let Some(messages) = record.get("messages") else {
        return Ok(vec![
            serde_json::json!({"role": "user", "content": templated}),
        ]);
    };
    let mut turns = messages
        .as_array()
        .cloned()
        .ok_or("`messages` is not a list")?;
    if turns.last().is_some_and(|t| t["role"] == "assistant") {
        turns.pop();
    }
    check_prompt_turns(&Value::Array(turns.clone()))?;
    Ok(turns)
}
