//! GLM tokenizer: `tokenizer.json` through the `tokenizers` crate, GLM's chat template, and a streaming
//! detokenizer that never emits a broken UTF-8 character.
//!
//! The chat template is rendered to text and the whole text is tokenized without adding special tokens,
//! exactly as transformers' `apply_chat_template(..., tokenize=True)` does, so the ids are identical
//! (tokenizing the pieces separately could merge bytes differently at the seams).
//!
//! ```no_run
//! use glm::tokenizer::{ChatMessage, GlmTokenizer};
//!
//! let tokenizer = GlmTokenizer::from_dir("models/demo")?;
//! let ids = tokenizer.encode_chat(&[
//!     ChatMessage::system("Answer briefly."),
//!     ChatMessage::user("Who was Hamlet?"),
//! ])?;
//! let mut stream = tokenizer.stream();
//! for &id in &ids {
//!     if let Some(piece) = stream.push(id)? {
//!         print!("{piece}");
//!     }
//! }
//! if let Some(rest) = stream.finish()? {
//!     print!("{rest}");
//! }
//! # Ok::<(), glm::tokenizer::TokenizerError>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::Tokenizer;

/// Prefix of every GLM chat prompt.
const GMASK: &str = "[gMASK]";
const SOP: &str = "<sop>";
const SYSTEM: &str = "<|system|>";
const USER: &str = "<|user|>";
const ASSISTANT: &str = "<|assistant|>";
const OBSERVATION: &str = "<|observation|>";
const ENDOFTEXT: &str = "<|endoftext|>";

/// Errors from loading a tokenizer, encoding a prompt or decoding ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{path}: not found. A GLM model directory needs tokenizer.json (the older ChatGLM layout of \
         glm-4-9b-chat ships only tokenizer.model: re-save it with transformers' \
         AutoTokenizer.from_pretrained(dir, trust_remote_code=True).save_pretrained(dir), \
         or use glm-4-9b-chat-hf's tokenizer.json)"
    )]
    MissingFile { path: PathBuf },
    #[error("{path}: cannot be read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid tokenizer file ({reason}); download it again or re-save it with transformers")]
    CorruptTokenizer { path: PathBuf, reason: String },
    #[error("{path}: not valid JSON ({reason}); download it again")]
    CorruptJson { path: PathBuf, reason: String },
    #[error(
        "{path}: special token {token} is missing or is not an added token, so GLM chat prompts cannot \
         be encoded; use the tokenizer.json published with the model"
    )]
    MissingSpecialToken { path: PathBuf, token: &'static str },
    #[error("empty prompt: give some text to respond to")]
    EmptyPrompt,
    #[error("tokenizer failed to encode the prompt: {0}")]
    Encode(String),
    #[error("tokenizer failed to decode token ids: {0}")]
    Decode(String),
    #[error(
        "streaming detokenizer: the tokenizer's decoder is not prefix-stable (\"{prefix}\" is not a \
         prefix of \"{text}\"); decode the whole sequence instead"
    )]
    UnstableDecoder { prefix: String, text: String },
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// The chat template variants of the supported GLM models (they agree on everything else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// glm-4-9b-chat(-hf), GLM-4-0414: the prompt ends with `<|assistant|>`, and messages whose content
    /// is empty are left out (the template's `{% if item['content'] %}`).
    Glm4,
    /// GLM-4.1V and AutoGLM-Phone (`Glm4vForConditionalGeneration`): the prompt ends with
    /// `<|assistant|>\n`, and every message is rendered.
    Glm41V,
}

impl ChatFormat {
    /// The text that asks the model for an answer.
    pub fn generation_prompt(self) -> &'static str {
        match self {
            ChatFormat::Glm4 => "<|assistant|>",
            ChatFormat::Glm41V => "<|assistant|>\n",
        }
    }

    /// Picks the variant for a model directory: from its chat template (`chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json`) when the template's generation prompt is one we know,
    /// else from `config.json`'s architecture, else [`ChatFormat::Glm4`].
    pub fn detect(model_dir: &Path) -> Result<ChatFormat> {
        if let Some(template) = read_chat_template(model_dir)? {
            if let Some(format) = Self::from_template(&template) {
                return Ok(format);
            }
        }
        let config_path = model_dir.join("config.json");
        if !config_path.exists() {
            return Ok(ChatFormat::Glm4);
        }
        let config = read_json(&config_path)?;
        let is_vision = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|archs| {
                archs
                    .iter()
                    .any(|a| a.as_str() == Some("Glm4vForConditionalGeneration"))
            })
            || config.get("model_type").and_then(|t| t.as_str()) == Some("glm4v");
        Ok(if is_vision {
            ChatFormat::Glm41V
        } else {
            ChatFormat::Glm4
        })
    }

    /// The variant whose generation prompt is the literal text of `{% if add_generation_prompt %}...`
    /// in a Jinja chat template; `None` for any other template.
    pub fn from_template(template: &str) -> Option<ChatFormat> {
        let after_flag = &template[template.rfind("add_generation_prompt")?..];
        let literal = &after_flag[after_flag.find("%}")? + 2..];
        let literal = &literal[..literal.find("{%").unwrap_or(literal.len())];
        [ChatFormat::Glm4, ChatFormat::Glm41V]
            .into_iter()
            .find(|f| f.generation_prompt() == literal)
    }
}

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool result.
    Observation,
}

impl Role {
    fn marker(self) -> &'static str {
        match self {
            Role::System => SYSTEM,
            Role::User => USER,
            Role::Assistant => ASSISTANT,
            Role::Observation => OBSERVATION,
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// Ids of GLM's special tokens, looked up by name in the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub gmask: u32,
    pub sop: u32,
    pub system: u32,
    pub user: u32,
    pub assistant: u32,
    pub observation: u32,
    pub endoftext: u32,
}

impl SpecialTokens {
    /// The ids GLM chat models stop on when config.json and generation_config.json name none:
    /// `<|endoftext|>`, `<|user|>` (the model hands the turn back) and `<|observation|>` (a tool call).
    pub fn default_stop_ids(&self) -> Vec<u32> {
        vec![self.endoftext, self.user, self.observation]
    }

    fn lookup(tokenizer: &Tokenizer, path: &Path) -> Result<Self> {
        let added = tokenizer.get_added_tokens_decoder();
        // Only added tokens are matched whole in the text; a plain vocabulary entry with the same
        // spelling would be split into pieces when the chat prompt is encoded.
        let id = |token: &'static str| {
            tokenizer
                .token_to_id(token)
                .filter(|id| added.get(id).is_some_and(|t| t.content == token))
                .ok_or_else(|| TokenizerError::MissingSpecialToken {
                    path: path.to_path_buf(),
                    token,
                })
        };
        Ok(Self {
            gmask: id(GMASK)?,
            sop: id(SOP)?,
            system: id(SYSTEM)?,
            user: id(USER)?,
            assistant: id(ASSISTANT)?,
            observation: id(OBSERVATION)?,
            endoftext: id(ENDOFTEXT)?,
        })
    }
}

/// A GLM tokenizer with its chat template. Cheap to clone (the vocabulary is shared).
#[derive(Clone)]
pub struct GlmTokenizer {
    inner: Arc<Tokenizer>,
    special: SpecialTokens,
    chat_format: ChatFormat,
}

impl fmt::Debug for GlmTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlmTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("chat_format", &self.chat_format)
            .finish()
    }
}

impl GlmTokenizer {
    /// Loads `tokenizer.json` from a model directory and picks the chat format with [`ChatFormat::detect`].
    pub fn from_dir(model_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = model_dir.as_ref();
        let format = ChatFormat::detect(dir)?;
        Self::from_file(dir.join("tokenizer.json"), format)
    }

    /// Loads a `tokenizer.json` file with the given chat format.
    pub fn from_file(path: impl AsRef<Path>, chat_format: ChatFormat) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner =
            Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::CorruptTokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let special = SpecialTokens::lookup(&inner, path)?;
        Ok(Self {
            inner: Arc::new(inner),
            special,
            chat_format,
        })
    }

    /// The same tokenizer with another chat format.
    pub fn with_chat_format(mut self, chat_format: ChatFormat) -> Self {
        self.chat_format = chat_format;
        self
    }

    pub fn chat_format(&self) -> ChatFormat {
        self.chat_format
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The prompt text of a conversation, as the model's Jinja chat template renders it with
    /// `add_generation_prompt=True`: `[gMASK]<sop>`, then `<|role|>\n{content}` per message, then the
    /// generation prompt. Errors with [`TokenizerError::EmptyPrompt`] when no user message has text.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let has_user_text = messages
            .iter()
            .any(|m| m.role == Role::User && !m.content.trim().is_empty());
        if !has_user_text {
            return Err(TokenizerError::EmptyPrompt);
        }
        let mut text = format!("{GMASK}{SOP}");
        for message in messages {
            if self.chat_format == ChatFormat::Glm4 && message.content.is_empty() {
                continue;
            }
            text.push_str(message.role.marker());
            text.push('\n');
            text.push_str(&message.content);
        }
        text.push_str(self.chat_format.generation_prompt());
        Ok(text)
    }

    /// Token ids of a conversation with the chat template (no special tokens added beyond the template's).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        self.encode_text(&text, false)
    }

    /// Token ids of a single-turn chat: an optional system prompt, then the user's prompt.
    pub fn encode_prompt(&self, system: Option<&str>, prompt: &str) -> Result<Vec<u32>> {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(ChatMessage::system(system));
        }
        messages.push(ChatMessage::user(prompt));
        self.encode_chat(&messages)
    }

    /// Token ids of plain text without a chat template: what transformers' `tokenizer(text)` gives, so
    /// the tokenizer's own post-processor decides on prefix tokens (GLM's adds `[gMASK]<sop>`).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(TokenizerError::EmptyPrompt);
        }
        self.encode_text(text, true)
    }

    fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of token ids with special tokens left out. Ids the tokenizer does not know (the padding rows
    /// of a model's embedding) are skipped, as transformers does.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        decode(&self.inner, ids)
    }

    /// A streaming detokenizer for generated ids.
    pub fn stream(&self) -> TokenStream {
        TokenStream {
            tokenizer: Arc::clone(&self.inner),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| TokenizerError::Decode(e.to_string()))
}

/// Turns generated ids into text pieces as they arrive.
///
/// A byte-level BPE token may hold part of a UTF-8 character; such a piece decodes to U+FFFD until the
/// rest arrives, so [`TokenStream::push`] holds text back while the decoded tail ends in U+FFFD. Each
/// decode covers only the ids since the previous piece, with the ids of that piece as left context (so
/// decoders that strip or merge at the start of a text still agree with a decode of the whole sequence).
/// The pieces from `push`, then [`TokenStream::finish`], concatenate to `decode(all ids)`.
pub struct TokenStream {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Start of the ids decoded for context: the ids of the last emitted piece begin here.
    prefix_offset: usize,
    /// Ids before this have been emitted as text.
    read_offset: usize,
}

impl TokenStream {
    /// Feeds one id; returns the text it completes, if any (special tokens give none).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let piece = self.pending_text()?;
        if piece.is_empty() || piece.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None);
        }
        self.advance();
        Ok(Some(piece))
    }

    /// Ends the stream: returns held-back text, with U+FFFD for a character whose bytes never all
    /// arrived (as a decode of all ids shows it).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let piece = self.pending_text()?;
        self.advance();
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// All ids fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Text of the ids after `read_offset`, decoded with the last emitted piece as context.
    fn pending_text(&self) -> Result<String> {
        let prefix = decode(
            &self.tokenizer,
            &self.ids[self.prefix_offset..self.read_offset],
        )?;
        let text = decode(&self.tokenizer, &self.ids[self.prefix_offset..])?;
        match text.strip_prefix(prefix.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => Err(TokenizerError::UnstableDecoder { prefix, text }),
        }
    }

    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::CorruptJson {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The model's Jinja chat template: transformers 5 saves it as `chat_template.jinja`, earlier versions
/// inside `tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
fn read_chat_template(model_dir: &Path) -> Result<Option<String>> {
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| TokenizerError::Io {
                path: jinja,
                source,
            });
    }
    let config_path = model_dir.join("tokenizer_config.json");
    if !config_path.is_file() {
        return Ok(None);
    }
    let config = read_json(&config_path)?;
    let template = match config.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    Ok(template)
}
