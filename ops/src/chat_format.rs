//! How an op turns a prompt into the text a model reads: the plain
//! `template`, or a chat template (the model folder's own, or a file bound
//! to the stage's `chat_template` input) rendered with the special tokens
//! transformers passes beside the conversation.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_template::{ChatTemplate, ChatTemplateError, Rendered};
use crate::text::Tokenizer;

/// `params.chat_template` of the ops that format prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplateChoice {
    /// The file bound to the `chat_template` input if any, else the model's
    /// own template (`chat_template.jinja`, or `chat_template` in
    /// `tokenizer_config.json`), else the plain `template`.
    #[default]
    Auto,
    /// The plain `template`, even for a model with a chat template.
    None,
}

impl ChatTemplateChoice {
    pub fn is_auto(&self) -> bool {
        *self == ChatTemplateChoice::Auto
    }
}

/// How a prompt record becomes model text: the params every op that samples
/// from a `prompts` input shares (flattened into its params).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PromptParams {
    /// Field holding the prompt.
    #[serde(default = "crate::defaults::prompt_field")]
    pub prompt_field: String,
    /// Prompt template; `{prompt}` is replaced by the prompt field. Give a
    /// stage that trains on the results (`sft`, `pm.train`) the same one.
    #[serde(default = "crate::defaults::prompt_template")]
    pub template: String,
    /// Chat template: `auto` formats each prompt as a user turn with the
    /// `chat_template` input's template, else the policy's own, else the
    /// plain `template`; `none` always uses `template`.
    #[serde(default, skip_serializing_if = "ChatTemplateChoice::is_auto")]
    pub chat_template: ChatTemplateChoice,
    /// Variables for the chat template beside the conversation, as
    /// transformers' `apply_chat_template` keyword arguments (Qwen3's
    /// `enable_thinking: false`, Llama 3.2's `date_string`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chat_template_kwargs: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Default for PromptParams {
    fn default() -> Self {
        PromptParams {
            prompt_field: crate::defaults::prompt_field(),
            template: crate::defaults::prompt_template(),
            chat_template: ChatTemplateChoice::Auto,
            chat_template_kwargs: Default::default(),
        }
    }
}

/// The doc of the `chat_template` input of the ops that format prompts.
pub const CHAT_TEMPLATE_INPUT: &str =
    "a Jinja chat template file, used instead of the model's own (with `chat_template: auto`)";

/// How the ops that format prompts render one, for `alignflow ops NAME`.
pub const CHAT_PROMPT_CONVENTION: &str = "prompt text: with a chat template, the record's `messages` (TRL's conversational format), else its prompt field through `template` as one user turn, rendered with the generation prompt (add_generation_prompt=True) and tokenized with no special tokens added (the template writes its BOS); without one, the prompt field through `template`";

/// How the training ops render an example, for `alignflow ops NAME`.
pub const CHAT_TRAINING_CONVENTION: &str = "example text: with a chat template, the prompt (a string as one user turn, or a list of messages ending with a user turn) rendered with the generation prompt, and the conversation with the response as the assistant's last turn, tokenized once with no special tokens added; the response is every token after as many as the prompt alone has (TRL's split; `prompt_boundary_mismatches` counts examples where the conversation does not start with the prompt's tokens), end-of-turn tokens included and no EOS appended; without one, the prompt with the tokenizer's BOS, then the response (+ EOS)";

/// Special tokens a template may write, as transformers names them.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// A chat template with the variables it is rendered with.
pub struct ChatFormat {
    template: ChatTemplate,
    variables: BTreeMap<String, serde_json::Value>,
    /// Where the template came from, for errors.
    pub source: String,
}

impl ChatFormat {
    /// The template for a stage: `choice`, the file bound to its
    /// `chat_template` input (`file`), else `model_dir`'s own; `None` means
    /// the plain `template`.
    pub fn for_stage(
        choice: ChatTemplateChoice,
        file: Option<&Path>,
        model_dir: &Path,
    ) -> anyhow::Result<Option<ChatFormat>> {
        Self::for_stage_with(choice, file, model_dir, &BTreeMap::new())
    }

    /// [`ChatFormat::for_stage`] with `kwargs`, the stage's
    /// `chat_template_kwargs`, beside the special tokens.
    pub fn for_stage_with(
        choice: ChatTemplateChoice,
        file: Option<&Path>,
        model_dir: &Path,
        kwargs: &BTreeMap<String, serde_json::Value>,
    ) -> anyhow::Result<Option<ChatFormat>> {
        for reserved in ["messages", "add_generation_prompt"] {
            anyhow::ensure!(
                !kwargs.contains_key(reserved),
                "`chat_template_kwargs.{reserved}` is the op's to set"
            );
        }
        if choice == ChatTemplateChoice::None {
            return Ok(None);
        }
        let (text, source) = match file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading the chat template {}", f.display()))?;
                (text, f.display().to_string())
            }
            None => match model_template(model_dir)? {
                Some(found) => found,
                None => {
                    // A processor's file, which transformers' tokenizer
                    // (and so TRL) does not read either.
                    if model_dir.join("chat_template.json").is_file() {
                        tracing::warn!(
                            "{} has a chat_template.json (a processor's file) but no chat_template.jinja and no `chat_template` in tokenizer_config.json: prompts go through the plain `template` (bind the template as the stage's `chat_template` input to use it)",
                            model_dir.display()
                        );
                    } else {
                        tracing::info!(
                            "no chat template in {}: prompts go through the plain `template`",
                            model_dir.display()
                        );
                    }
                    return Ok(None);
                }
            },
        };
        tracing::info!("chat template: {source}");
        let mut variables = special_tokens(model_dir)?;
        variables.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        let format = ChatFormat::new(&text, variables, source.clone()).with_context(|| source)?;
        Ok(Some(format))
    }

    /// `text` compiled, rendered with `variables` (special tokens, template
    /// kwargs) beside the conversation; `source` names it in errors.
    pub fn new(
        text: &str,
        variables: BTreeMap<String, serde_json::Value>,
        source: String,
    ) -> Result<ChatFormat, ChatTemplateError> {
        Ok(ChatFormat {
            template: ChatTemplate::new(text)?,
            variables,
            source,
        })
    }

    /// `messages` rendered for the model to continue as the assistant.
    pub fn prompt(&self, messages: &serde_json::Value) -> Result<Rendered, ChatTemplateError> {
        self.template.render(messages, true, &self.variables)
    }

    /// Whether the template marks the assistant's text with `{% generation
    /// %}` (then every assistant turn of a conversation can be trained on).
    pub fn marks_generation(&self) -> bool {
        self.template.marks_generation
    }

    /// A whole conversation (ending with the assistant's turn) rendered
    /// without the generation prompt, with the assistant's character spans.
    pub fn conversation(
        &self,
        messages: &serde_json::Value,
    ) -> Result<Rendered, ChatTemplateError> {
        self.template.render(messages, false, &self.variables)
    }

    /// A prompt conversation and its response as the training ops see them,
    /// as TRL builds a prompt-completion example: the prompt rendered with
    /// the generation prompt, and the whole conversation with `response` as
    /// the assistant's last turn (no generation prompt).
    pub fn completion(
        &self,
        prompt: &serde_json::Value,
        response: &str,
    ) -> Result<Completion, ChatTemplateError> {
        let mut messages = prompt.as_array().cloned().unwrap_or_default();
        messages.push(serde_json::json!({"role": "assistant", "content": response}));
        let full = serde_json::Value::Array(messages);
        Ok(Completion {
            prompt: self.prompt(prompt)?.text,
            full: self.template.render(&full, false, &self.variables)?.text,
        })
    }
}

/// A rendered prompt-completion example (see [`ChatFormat::completion`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The prompt conversation with the generation prompt.
    pub prompt: String,
    /// The conversation with the response as the assistant's last turn.
    pub full: String,
}

impl Completion {
    /// The prompt's tokens and the response's, split as TRL splits them: the
    /// whole conversation is tokenized once (no special tokens added: the
    /// template writes its own) and the response is what follows as many
    /// tokens as the prompt alone has, end-of-turn tokens included. The flag
    /// says the conversation's first tokens differ from the prompt's (a
    /// template that renders the history otherwise, or a merge across the
    /// boundary), which TRL warns about.
    pub fn token_ids(&self, tokenizer: &Tokenizer) -> anyhow::Result<(Vec<i64>, Vec<i64>, bool)> {
        let prompt = tokenizer.encode(&self.prompt)?;
        let mut full = tokenizer.encode(&self.full)?;
        let split = prompt.len().min(full.len());
        let mismatch = full[..split] != prompt[..];
        let response = full.split_off(split);
        Ok((full, response, mismatch))
    }
}

/// `dir`'s own chat template and where it was found: transformers 5's
/// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`
/// (a string, or a list of named templates, of which `default` is used).
pub fn model_template(dir: &Path) -> anyhow::Result<Option<(String, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    let config_path = dir.join("tokenizer_config.json");
    let Some(config) = read_json(&config_path)? else {
        return Ok(None);
    };
    let source = format!("{} (chat_template)", config_path.display());
    match &config["chat_template"] {
        serde_json::Value::String(text) => Ok(Some((text.clone(), source))),
        serde_json::Value::Array(named) => {
            let default = named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .with_context(|| {
                    format!("{source}: a list of named templates with none named `default`")
                })?;
            Ok(Some((default.to_string(), source)))
        }
        _ => Ok(None),
    }
}

/// `tokenizer_config.json`'s special tokens as the strings a template sees
/// (an `AddedToken` object gives its `content`).
fn special_tokens(dir: &Path) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut vars = BTreeMap::new();
    let Some(config) = read_json(&dir.join("tokenizer_config.json"))? else {
        return Ok(vars);
    };
    for key in SPECIAL_TOKENS {
        if let Some(token) = crate::text::token_text(&config[key]) {
            vars.insert(key.to_string(), token.into());
        }
    }
    Ok(vars)
}

fn read_json(path: &Path) -> anyhow::Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

    fn folder(config: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn the_models_own_template_renders_with_its_special_tokens() {
        let dir = folder(json!({
            "chat_template": TEMPLATE,
            "bos_token": {"content": "<s>", "special": true},
            "eos_token": "</s>",
        }));
        let chat = ChatFormat::for_stage(ChatTemplateChoice::Auto, None, dir.path())
            .unwrap()
            .unwrap();
        let text = chat
            .prompt(&json!([{"role": "user", "content": "hi"}]))
            .unwrap()
            .text;
        assert_eq!(text, "<s><user>hi\n<assistant>");
        // `none` keeps the plain template.
        assert!(
            ChatFormat::for_stage(ChatTemplateChoice::None, None, dir.path())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_bound_file_wins_and_named_templates_use_default() {
        let dir = folder(json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ messages[0].content }}!"},
        ]}));
        let (text, _) = model_template(dir.path()).unwrap().unwrap();
        assert_eq!(text, "{{ messages[0].content }}!");
        let file = dir.path().join("mine.jinja");
        std::fs::write(&file, "[{{ messages[0].content }}]").unwrap();
        let chat = ChatFormat::for_stage(ChatTemplateChoice::Auto, Some(&file), dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(
            chat.prompt(&json!([{"role": "user", "content": "x"}]))
                .unwrap()
                .text,
            "[x]"
        );
        // transformers 5's separate file comes before the config's.
        std::fs::write(dir.path().join("chat_template.jinja"), "jinja file").unwrap();
        assert_eq!(model_template(dir.path()).unwrap().unwrap().0, "jinja file");
    }

    /// `chat_template_kwargs` reach the template as transformers' keyword
    /// arguments do (Qwen3's `enable_thinking`); the op's own are refused.
    #[test]
    fn template_kwargs_are_variables_beside_the_conversation() {
        let dir = folder(json!({"eos_token": "</s>"}));
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages[0].content }}{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}",
        )
        .unwrap();
        let kwargs = BTreeMap::from([("enable_thinking".to_string(), json!(false))]);
        let turns = json!([{"role": "user", "content": "x"}]);
        let with = ChatFormat::for_stage_with(ChatTemplateChoice::Auto, None, dir.path(), &kwargs)
            .unwrap()
            .unwrap();
        assert_eq!(with.prompt(&turns).unwrap().text, "x<think></think>");
        let without = ChatFormat::for_stage(ChatTemplateChoice::Auto, None, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(without.prompt(&turns).unwrap().text, "x");
        let reserved = BTreeMap::from([("add_generation_prompt".to_string(), json!(true))]);
        let err = ChatFormat::for_stage_with(ChatTemplateChoice::Auto, None, dir.path(), &reserved)
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("chat_template_kwargs.add_generation_prompt"),
            "{err}"
        );
    }

    #[test]
    fn no_template_means_the_plain_one() {
        let dir = folder(json!({"eos_token": "</s>"}));
        assert!(
            ChatFormat::for_stage(ChatTemplateChoice::Auto, None, dir.path())
                .unwrap()
                .is_none()
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(model_template(empty.path()).unwrap().is_none());
    }
}
