//! A tiny world for the RL tests: dialogues about a few topics, and
//! comparisons whose chosen response is half the word `a` (the rejected one
//! has few), so a preference model trained on them likes `a` and a policy
//! has something to learn. Seeded: every test sees the same data.

use super::Lcg;

pub const WORDS: &[&str] = &[
    "the", "sun", "moon", "fish", "red", "blue", "green", "sky", "tree", "dog", "big", "on", "ice",
    "fox", "sit", "run",
];

/// A raw prompt (`tell me about the sun`).
pub fn topic(rng: &mut Lcg) -> String {
    format!("tell me about the {}", rng.pick(WORDS))
}

/// `q` in the HH dialogue format, ready for the answer.
pub fn dialogue(q: &str) -> String {
    format!("\n\nHuman: {q}\n\nAssistant:")
}

/// A dialogue prompt.
pub fn prompt(rng: &mut Lcg) -> String {
    dialogue(&topic(rng))
}

/// `n` words, each the word `a` with probability `share_a` percent.
pub fn response(rng: &mut Lcg, n: usize, share_a: usize) -> String {
    let words: Vec<&str> = (0..n)
        .map(|_| {
            if rng.below(100) < share_a {
                "a"
            } else {
                rng.pick(WORDS)
            }
        })
        .collect();
    format!(" {}", words.join(" "))
}

/// HH-format dialogues for the tokenizer and the base LMs: `a` one word in
/// ten.
pub fn corpus(n: usize) -> String {
    let mut rng = Lcg(3);
    (0..n)
        .map(|_| {
            let q = prompt(&mut rng);
            serde_json::json!({
                "chosen": format!("{q}{}", response(&mut rng, 8, 10)),
                "rejected": format!("{q}{}", response(&mut rng, 8, 10)),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Comparisons for the PM: the chosen response is half `a`.
pub fn comparisons(n: usize) -> String {
    let mut rng = Lcg(11);
    (0..n)
        .map(|_| {
            serde_json::json!({
                "prompt": prompt(&mut rng),
                "chosen": response(&mut rng, 8, 50),
                "rejected": response(&mut rng, 8, 5),
                "label": 1.0,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// `n` prompt records (`{"prompt": ...}`) from `make`, seeded with `seed`.
pub fn prompts(n: usize, seed: u64, make: fn(&mut Lcg) -> String) -> String {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|_| serde_json::json!({ "prompt": make(&mut rng) }).to_string() + "\n")
        .collect()
}

/// The stages every RL test starts from, on the files above (`hh.jsonl`,
/// `comparisons.jsonl`): a tokenizer, a small GPT-2 base model and a
/// preference model that likes `a`.
pub const BASE_STAGES: &str = r#"  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 320 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 48, layers: 2, heads: 2, positions: 64, seq_len: 32, batch_size: 16, max_steps: 40, lr: 3e-3, checkpoint_every: 0 }
  pm:
    op: pm.train
    inputs: { model: "${stages.base.model}", comparisons: comparisons.jsonl }
    params: { batch_size: 16, max_steps: 60, lr: 3e-3, warmup_steps: 3, checkpoint_every: 0, append_eos: false, eval_fraction: 0.1 }
"#;

/// A manifest: `head` (name, seed, params), then [`BASE_STAGES`], then
/// `stages` (the stages under test, YAML at two spaces).
pub fn manifest(head: &str, stages: &str) -> String {
    format!("version: 1\n{head}stages:\n{BASE_STAGES}{stages}")
}
