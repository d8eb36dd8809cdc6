//! Chat templates (the Jinja `chat_template` a checkpoint ships), rendered
//! as transformers' `apply_chat_template` renders them, so a model sees the
//! same text in alignflow as in the framework it was trained with.
//!
//! What transformers does, and this module mirrors: Jinja with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods
//! on strings (`.strip()`, `.startswith()`), a `tojson` that writes what
//! Python's `json.dumps(ensure_ascii=False)` writes, the globals
//! `raise_exception` and `strftime_now`, and the variables `messages`,
//! `tools` and `documents` (none here), `add_generation_prompt`, the
//! tokenizer's special tokens (`bos_token`, `eos_token`, ...) and any
//! template kwargs (Qwen3's `enable_thinking`). `{% generation %}` blocks
//! (training templates) mark the assistant's text: [`Rendered::assistant`]
//! gives their character ranges, as `return_assistant_tokens_mask` does.

use std::collections::BTreeMap;
use std::ops::Range;

use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind};

/// Brackets the text of a `{% generation %}` block while rendering; removed
/// from the result. Private-use code points no template writes.
const GENERATION_START: char = '\u{F8F0}';
const GENERATION_END: char = '\u{F8F1}';

/// The one template of an environment.
const NAME: &str = "chat_template";

/// A chat template that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template does not parse.
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    /// The template refused the conversation (`raise_exception`), or failed
    /// while rendering it.
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template marks the assistant's text with `{% generation %}`.
    pub marks_generation: bool,
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    /// Character (not byte) ranges of `text` inside `{% generation %}`
    /// blocks, in order.
    pub assistant: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source` the way transformers does.
    pub fn new(source: &str) -> Result<ChatTemplate, ChatTemplateError> {
        let (source, marks_generation) = generation_as_filter_blocks(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("__alignflow_generation", |body: String| {
            format!("{GENERATION_START}{body}{GENERATION_END}")
        });
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source)
            .map_err(|e| ChatTemplateError::Compile(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            marks_generation,
        })
    }

    /// Renders `messages` (a list of `{role, content, ...}` objects) with
    /// `variables` (special tokens, template kwargs) beside them.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        variables: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Rendered, ChatTemplateError> {
        let mut context: BTreeMap<String, Value> = variables
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(Serde(v))))
            .collect();
        let messages = as_transformers_passes(messages);
        context.insert("messages".into(), Value::from(Serde(&messages)));
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));
        let template = self.env.get_template(NAME).expect("compiled in new");
        let raw = template
            .render(Value::from(Serde(&context)))
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        Ok(strip_generation_marks(&raw))
    }
}

/// The names a message's reasoning comes under; templates read the first.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// `messages` as transformers' `apply_chat_template` hands them to a
/// template: keys whose value is null dropped (data exported with a mixed
/// schema carries `tool_calls: null`, on which Llama 3.1's template fails
/// and others print "None"), and a reasoning trace given as `thinking` or
/// `reasoning` also under `reasoning_content` (Qwen3's) and `thinking`
/// (gpt-oss's).
fn as_transformers_passes(messages: &serde_json::Value) -> serde_json::Value {
    let Some(list) = messages.as_array() else {
        return messages.clone();
    };
    let message = |m: &serde_json::Value| {
        let Some(fields) = m.as_object() else {
            return m.clone();
        };
        let mut fields: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let reasoning = REASONING_FIELDS
            .iter()
            .find_map(|key| fields.get(*key))
            .cloned();
        if let Some(reasoning) = reasoning {
            fields
                .entry("thinking")
                .or_insert_with(|| reasoning.clone());
            fields.insert("reasoning_content".into(), reasoning);
        }
        serde_json::Value::Object(fields)
    };
    serde_json::Value::Array(list.iter().map(message).collect())
}

impl Rendered {
    /// Which of `tokenizer`'s tokens of [`Rendered::text`] (encoded without
    /// added special tokens) belong to the assistant: the tokens from the one
    /// holding a block's first character to the one holding its last, as
    /// transformers' `return_assistant_tokens_mask` marks them.
    pub fn assistant_token_mask(
        &self,
        tokenizer: &tokenizers::Tokenizer,
    ) -> Result<Vec<bool>, tokenizers::Error> {
        let encoding = tokenizer.encode_char_offsets(self.text.as_str(), false)?;
        let mut mask = vec![false; encoding.get_ids().len()];
        for span in self.assistant.iter().filter(|s| !s.is_empty()) {
            let Some(first) = encoding.char_to_token(span.start, 0) else {
                break; // past the end (truncated)
            };
            let last = encoding
                .char_to_token(span.end - 1, 0)
                .unwrap_or(mask.len() - 1);
            for m in &mut mask[first..=last] {
                *m = true;
            }
        }
        Ok(mask)
    }
}

/// `{% generation %}` is a tag of transformers' own Jinja extension; as a
/// filter block it renders its body through a filter that brackets it, and
/// keeps the block-tag whitespace rules (`trim_blocks`, `-`) unchanged.
fn generation_as_filter_blocks(source: &str) -> (String, bool) {
    let start = regex_lite_replace(source, "generation", "filter __alignflow_generation");
    let both = regex_lite_replace(&start, "endgeneration", "endfilter");
    let marks = both != source;
    (both, marks)
}

/// Replaces the block tag `{% word %}` (with any `-` and spaces inside the
/// delimiters) by `{% replacement %}`, keeping the `-` markers.
fn regex_lite_replace(source: &str, word: &str, replacement: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => (body, ""),
        };
        if body.trim() == word {
            out.push_str(&format!("{{%{lead} {replacement} {trail}%}}"));
        } else {
            out.push_str(&tag[..end + 2]);
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The text without the generation brackets, and where they were.
fn strip_generation_marks(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut assistant = Vec::new();
    let mut chars = 0;
    let mut open: Option<usize> = None;
    for c in raw.chars() {
        match c {
            GENERATION_START => open = Some(chars),
            GENERATION_END => {
                if let Some(start) = open.take() {
                    assistant.push(start..chars);
                }
            }
            c => {
                text.push(c);
                chars += 1;
            }
        }
    }
    Rendered { text, assistant }
}

/// transformers' `tojson`, Python's `json.dumps(value, ensure_ascii=False,
/// indent=None, separators=None)` with those keywords: `", "` and `": "`
/// between items without indent, no HTML escaping (Jinja's own `tojson`
/// escapes `<`, `>`, `&` and `'`). Keys come sorted whatever `sort_keys`
/// says: the data's maps are read in key order.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let separators = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: separators must be two strings, not {}",
                    other.len()
                ),
            ))
        }
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, &separators, 0, &mut out);
    if ensure_ascii == Some(true) {
        out = escape_non_ascii(&out);
    }
    Ok(Value::from_safe_string(out))
}

/// `\uXXXX` (UTF-16, lower-case hex, as Python writes it) for every
/// character beyond ASCII; only strings hold such characters.
fn escape_non_ascii(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn write_python_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    separators: &(String, String),
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = (separators.0.as_str(), separators.1.as_str());
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, separators, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("a string serialises"));
                out.push_str(key_sep);
                write_python_json(item, indent, separators, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        J::Number(n) if n.is_f64() => out.push_str(&python_float(n.as_f64().unwrap_or(f64::NAN))),
        other => out.push_str(&serde_json::to_string(other).expect("JSON serialises")),
    }
}

/// A float as Python's `repr` writes it (`1.0`, not `1`).
fn python_float(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains('e') && !s.contains("e-") && !s.contains("e+") {
        s.replace('e', "e+")
    } else {
        s
    }
}

/// The instant `strftime_now` renders: 26 July 2024, Llama 3.2's own
/// date when the function is missing.
pub const TEMPLATE_DATE: &str = "2024-07-26T00:00:00+00:00[UTC]";

/// `strftime_now(format)`: formatted as Python's `strftime`, but of a fixed
/// date ([`TEMPLATE_DATE`]), not today's as transformers renders it. Llama
/// 3.2's template dates every system header with it: with today's date, a
/// stage's rendering (and so its cached outputs, or a cached DPO
/// reference's token ids against its `dpo` stage's) would change with the
/// day. Templates that take `date_string` still take it.
fn strftime_now(format: String) -> Result<Value, Error> {
    let date: jiff::Zoned = TEMPLATE_DATE.parse().expect("a valid instant");
    jiff::fmt::strtime::format(format.as_str(), &date)
        .map(Value::from)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// minijinja's error with the template line it points at.
fn describe(e: &Error) -> String {
    match (e.detail(), e.line()) {
        (Some(detail), Some(line)) => format!("{detail} (template line {line})"),
        (Some(detail), None) => detail.to_string(),
        (None, Some(line)) => format!("{} (template line {line})", e.kind()),
        (None, None) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: serde_json::Value, gen: bool) -> Rendered {
        ChatTemplate::new(source)
            .unwrap()
            .render(&messages, gen, &BTreeMap::new())
            .unwrap()
    }

    /// Llama 3.2 dates its system header: with a fixed date, not today's,
    /// a stage renders alike on any day; `date_string` still wins.
    #[test]
    fn the_template_date_is_fixed_and_date_string_still_wins() {
        let source = "{%- if not date_string is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- endif %}Today Date: {{ date_string }}";
        let r = render(source, serde_json::json!([]), false);
        assert_eq!(r.text, "Today Date: 26 Jul 2024");
        let given = ChatTemplate::new(source)
            .unwrap()
            .render(
                &serde_json::json!([]),
                false,
                &BTreeMap::from([("date_string".to_string(), serde_json::json!("01 Jan 2030"))]),
            )
            .unwrap();
        assert_eq!(given.text, "Today Date: 01 Jan 2030");
    }

    #[test]
    fn generation_blocks_give_character_ranges_and_vanish_from_the_text() {
        let source = "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}";
        let r = render(
            source,
            serde_json::json!([
                {"role": "user", "content": "héllo"},
                {"role": "assistant", "content": "wörld"}
            ]),
            false,
        );
        assert_eq!(r.text, "user: héllo\nassistant: wörld\n");
        assert_eq!(r.assistant, vec![23..28]);
        let chars: Vec<char> = r.text.chars().collect();
        assert_eq!(chars[23..28].iter().collect::<String>(), "wörld");
    }

    #[test]
    fn null_keys_are_dropped_and_reasoning_is_aliased_as_transformers_does() {
        // Llama 3.1's test for tool calls, which fails on a null value.
        let source = "{% for m in messages %}{% if 'tool_calls' in m %}{{ m.tool_calls | length }}{% endif %}{{ m.role }}[{{ m.reasoning_content }}|{{ m.thinking }}]{{ m.content }};{% endfor %}";
        let r = render(
            source,
            serde_json::json!([
                {"role": "user", "content": "hi", "tool_calls": null},
                {"role": "assistant", "content": "yes", "reasoning": "think"},
                {"role": "assistant", "content": "no", "thinking": "a", "reasoning_content": "b"}
            ]),
            false,
        );
        assert_eq!(
            r.text,
            "user[|]hi;assistant[think|think]yes;assistant[b|a]no;"
        );
    }

    #[test]
    fn tag_rewriting_keeps_whitespace_markers_and_other_tags() {
        assert_eq!(
            regex_lite_replace("a{%- generation -%}b{% if x %}", "generation", "filter f"),
            "a{%- filter f -%}b{% if x %}"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('System role not supported') }}").unwrap();
        let err = t
            .render(&serde_json::json!([]), false, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("System role not supported"), "{err}");
    }

    #[test]
    fn tojson_takes_pythons_separators_and_ensure_ascii() {
        let r = render(
            "{{ messages | tojson(separators=(',', ':'), ensure_ascii=true) }}",
            serde_json::json!([{"content": "é🦀\n", "k": [1, 2]}]),
            false,
        );
        // json.dumps([{"content": "é🦀\n", "k": [1, 2]}], separators=(",", ":"), ensure_ascii=True)
        assert_eq!(r.text, r#"[{"content":"\u00e9\ud83e\udd80\n","k":[1,2]}]"#);
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let r = render(
            "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
            serde_json::json!([{"content": "<b>é</b>", "n": 1.0, "k": [1, 2]}]),
            false,
        );
        assert_eq!(
            r.text,
            "[{\"content\": \"<b>é</b>\", \"k\": [1, 2], \"n\": 1.0}]|{\n  \"content\": \"<b>é</b>\",\n  \"k\": [\n    1,\n    2\n  ],\n  \"n\": 1.0\n}"
        );
    }
}
