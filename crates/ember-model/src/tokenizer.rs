//! The tokenizer (`tokenizer.json` through the `tokenizers` crate) and the chat template
//! (`tokenizer_config.json` or `chat_template.jinja`), rendered as transformers'
//! `apply_chat_template` renders it: Jinja with `trim_blocks` and `lstrip_blocks`,
//! `raise_exception`, `strftime_now`, Python string methods, and `add_generation_prompt`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A turn with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A Jinja chat template with the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// A template from its Jinja source and the tokenizer's bos/eos strings.
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` as transformers' `apply_chat_template(tokenize=False)` does.
    ///
    /// A template is code from the model's files, so it runs under limits: an instruction
    /// budget (fuel) that grows with the conversation, an output of at most
    /// [`ChatTemplate::MAX_OUTPUT_BASE`] + 8 × the messages' text, and, in the `ember` binary,
    /// a memory budget ([`crate::allocator::TemplateMemoryBudget`]). A template that loops
    /// without end or writes without end fails with an error instead of hanging.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        let content: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        env.set_fuel(Some(
            Self::FUEL_BASE + Self::FUEL_PER_MESSAGE * messages.len() as u64 + 8 * content as u64,
        ));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Deterministic output: templates use it for a "today" line in system prompts.
            String::new()
        });
        env.add_template("chat", &self.source)
            .map_err(|e| ModelError::ChatTemplate(format!("cannot parse: {e:#}")))?;
        let template = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let limit = Self::MAX_OUTPUT_BASE + 8 * content;
        let mut out = LimitedOutput {
            bytes: Vec::new(),
            limit,
        };
        let _budget = crate::allocator::TemplateMemoryBudget::enter(Self::MAX_MEMORY_BASE + 64 * content);
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|e| ModelError::ChatTemplate(format!("rendered invalid UTF-8: {e}"))),
            Err(e) if out.bytes.len() > limit => Err(ModelError::ChatTemplate(format!(
                "the template wrote more than {limit} bytes for {} messages of {content} bytes; refusing it ({e})",
                messages.len()
            ))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(ModelError::ChatTemplate(format!(
                "the template did not finish within its instruction budget for {} messages (an endless or \
                 nested loop?); refusing it",
                messages.len()
            ))),
            Err(e) => Err(ModelError::ChatTemplate(format!("cannot render: {e:#}"))),
        }
    }

    /// Template instructions allowed for any conversation.
    pub const FUEL_BASE: u64 = 200_000;
    /// Further instructions allowed per message.
    pub const FUEL_PER_MESSAGE: u64 = 20_000;
    /// Output bytes allowed beyond 8 × the conversation's text.
    pub const MAX_OUTPUT_BASE: usize = 1 << 20;
    /// Memory a render may hold beyond 64 × the conversation's text.
    pub const MAX_MEMORY_BASE: usize = 256 << 20;
}

/// A byte sink that refuses writes past `limit` bytes.
struct LimitedOutput {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.bytes
                .extend_from_slice(&buf[..(self.limit + 1).saturating_sub(self.bytes.len()).min(buf.len())]);
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Beginning-of-sequence token, if the tokenizer config names one.
    pub bos_token: Option<String>,
    /// End-of-sequence token, if the tokenizer config names one.
    pub eos_token: Option<String>,
    /// Padding token, if the tokenizer config names one.
    pub pad_token: Option<String>,
    /// The chat template, if the model ships one.
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// A token string in `tokenizer_config.json`: plain or an `AddedToken` object.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja` when present,
    /// from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
                path: config_path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: config_path.clone(),
                source,
            })?
        } else {
            Value::Null
        };
        let bos_token = token_string(config.get("bos_token"));
        let eos_token = token_string(config.get("eos_token"));
        let pad_token = token_string(config.get("pad_token"));
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|source| ModelError::Io {
                path: jinja_path.clone(),
                source,
            })?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: transformers uses the one named "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let chat_template = source.map(|s| {
            ChatTemplate::new(
                s,
                bos_token.clone().unwrap_or_default(),
                eos_token.clone().unwrap_or_default(),
            )
        });
        Ok(Self {
            inner,
            path,
            bos_token,
            eos_token,
            pad_token,
            chat_template,
        })
    }

    /// Wraps an already built `tokenizers` tokenizer (e.g. one made from GGUF metadata).
    pub fn from_parts(inner: tokenizers::Tokenizer, path: PathBuf, chat_template: Option<ChatTemplate>) -> Self {
        Self {
            inner,
            path,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            chat_template,
        }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encode_full(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Encodes text and returns the full encoding (ids, tokens, offsets).
    pub fn encode_full(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Token offsets in characters (as Python's `tokenizers` reports them); the Rust crate
    /// reports bytes.
    pub fn char_offsets(text: &str, encoding: &tokenizers::Encoding) -> Vec<(usize, usize)> {
        let mut byte_to_char = vec![0usize; text.len() + 1];
        let mut chars = 0;
        for (i, _) in text.char_indices() {
            byte_to_char[i] = chars;
            chars += 1;
        }
        byte_to_char[text.len()] = chars;
        // Bytes inside a multi-byte character map to the character that holds them.
        for i in 1..byte_to_char.len() {
            if !text.is_char_boundary(i) {
                byte_to_char[i] = byte_to_char[i - 1];
            }
        }
        encoding
            .get_offsets()
            .iter()
            .map(|&(a, b)| (byte_to_char[a.min(text.len())], byte_to_char[b.min(text.len())]))
            .collect()
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Renders `messages` with the chat template; errors if the model has none.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!(
                "the tokenizer at `{}` has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)",
                self.path.display()
            ))
        })?;
        template.render(messages, add_generation_prompt)
    }
}
