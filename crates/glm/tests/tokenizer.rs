//! The GLM tokenizer against transformers' references (tests/fixtures/make_tokenizer_fixtures.py).

use std::path::{Path, PathBuf};

use glm::tokenizer::{ChatFormat, ChatMessage, GlmTokenizer, Role, TokenizerError};
use serde::Deserialize;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn read_reference<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = fixture_dir().join("references").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_tokenizer() -> GlmTokenizer {
    GlmTokenizer::from_dir(fixture_dir()).expect("fixture tokenizer loads")
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct ChatCase {
    name: String,
    format: String,
    messages: Vec<Message>,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct EncodeCase {
    text: String,
    ids: Vec<u32>,
    ids_no_special: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    decoded: String,
}

#[derive(Deserialize)]
struct EncodeReferences {
    vocab_size: usize,
    encodes: Vec<EncodeCase>,
    decodes: Vec<DecodeCase>,
}

fn to_messages(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => panic!("unexpected role {other} in the references"),
            };
            ChatMessage::new(role, m.content.clone())
        })
        .collect()
}

#[test]
fn chat_ids_equal_transformers_apply_chat_template() {
    let cases: Vec<ChatCase> = read_reference("chat.json");
    let base = fixture_tokenizer();
    let mut formats_seen = std::collections::BTreeSet::new();
    for case in &cases {
        let format = match case.format.as_str() {
            "glm4" => ChatFormat::Glm4,
            "glm41v" => ChatFormat::Glm41V,
            other => panic!("unexpected format {other}"),
        };
        formats_seen.insert(case.format.as_str());
        let tokenizer = base.clone().with_chat_format(format);
        let messages = to_messages(&case.messages);
        let text = tokenizer.render_chat(&messages).unwrap();
        assert_eq!(
            text, case.text,
            "{} ({}): rendered text",
            case.name, case.format
        );
        let ids = tokenizer.encode_chat(&messages).unwrap();
        assert_eq!(ids, case.ids, "{} ({}): ids", case.name, case.format);
    }
    assert_eq!(formats_seen.len(), 2);
    assert!(cases.len() >= 16, "only {} chat references", cases.len());
}

#[test]
fn single_turn_prompt_equals_the_chat_encoding() {
    let cases: Vec<ChatCase> = read_reference("chat.json");
    let tokenizer = fixture_tokenizer();
    let case = cases
        .iter()
        .find(|c| c.name == "system_user" && c.format == "glm4")
        .unwrap();
    let ids = tokenizer
        .encode_prompt(Some(&case.messages[0].content), &case.messages[1].content)
        .unwrap();
    assert_eq!(ids, case.ids);
    let user_only = cases
        .iter()
        .find(|c| c.name == "user_ascii" && c.format == "glm4")
        .unwrap();
    assert_eq!(
        tokenizer
            .encode_prompt(None, &user_only.messages[0].content)
            .unwrap(),
        user_only.ids
    );
}

#[test]
fn special_tokens_are_looked_up_by_name() {
    let tokenizer = fixture_tokenizer();
    let special = *tokenizer.special_tokens();
    let id = |name: &str| tokenizer.inner().token_to_id(name).unwrap();
    assert_eq!(special.gmask, id("[gMASK]"));
    assert_eq!(special.sop, id("<sop>"));
    assert_eq!(special.system, id("<|system|>"));
    assert_eq!(special.user, id("<|user|>"));
    assert_eq!(special.assistant, id("<|assistant|>"));
    assert_eq!(special.observation, id("<|observation|>"));
    assert_eq!(special.endoftext, id("<|endoftext|>"));
    // The fixture, like GLM's tokenizers, has its special tokens after the BPE vocabulary.
    assert!(special.gmask > 256 && special.gmask != special.sop);
    assert_eq!(
        special.default_stop_ids(),
        vec![special.endoftext, special.user, special.observation]
    );
    let ids = tokenizer.encode_prompt(None, "hello").unwrap();
    assert_eq!(&ids[..3], &[special.gmask, special.sop, special.user]);
    assert_eq!(*ids.last().unwrap(), special.assistant);
}

#[test]
fn raw_encoding_and_decoding_equal_transformers() {
    let refs: EncodeReferences = read_reference("encode.json");
    let tokenizer = fixture_tokenizer();
    assert_eq!(tokenizer.vocab_size(), refs.vocab_size);
    for case in &refs.encodes {
        assert_eq!(
            tokenizer.encode_raw(&case.text).unwrap(),
            case.ids,
            "{:?}",
            case.text
        );
        let plain = tokenizer.inner().encode(case.text.as_str(), false).unwrap();
        assert_eq!(plain.get_ids(), case.ids_no_special, "{:?}", case.text);
        assert_eq!(tokenizer.decode(&case.ids).unwrap(), case.decoded);
    }
    for case in &refs.decodes {
        assert_eq!(
            tokenizer.decode(&case.ids).unwrap(),
            case.decoded,
            "{:?}",
            case.ids
        );
    }
}

/// Streams `ids` one at a time; returns the pieces and how many non-special ids produced no text.
fn stream_pieces(tokenizer: &GlmTokenizer, ids: &[u32]) -> (Vec<String>, usize) {
    let special = tokenizer.special_tokens();
    let specials = [
        special.gmask,
        special.sop,
        special.system,
        special.user,
        special.assistant,
        special.observation,
        special.endoftext,
    ];
    let mut stream = tokenizer.stream();
    let mut pieces = Vec::new();
    let mut held = 0;
    for &id in ids {
        match stream.push(id).unwrap() {
            Some(piece) => {
                assert!(!piece.is_empty());
                assert!(
                    !piece.ends_with('\u{FFFD}'),
                    "push emitted a piece ending in U+FFFD: {piece:?}"
                );
                pieces.push(piece);
            }
            None if !specials.contains(&id) => held += 1,
            None => {}
        }
    }
    pieces.extend(stream.finish().unwrap());
    assert_eq!(stream.ids(), ids);
    (pieces, held)
}

#[test]
fn streaming_pieces_concatenate_to_the_full_decode() {
    let refs: EncodeReferences = read_reference("encode.json");
    let chats: Vec<ChatCase> = read_reference("chat.json");
    let tokenizer = fixture_tokenizer();
    let sequences = refs
        .decodes
        .iter()
        .map(|c| (c.ids.clone(), c.decoded.clone()))
        .chain(
            refs.encodes
                .iter()
                .map(|c| (c.ids.clone(), c.decoded.clone())),
        )
        .chain(chats.iter().map(|c| {
            let text = tokenizer.decode(&c.ids).unwrap();
            (c.ids.clone(), text)
        }));
    for (ids, expected) in sequences {
        let (pieces, _) = stream_pieces(&tokenizer, &ids);
        assert_eq!(pieces.concat(), expected, "{ids:?}");
    }
}

#[test]
fn streaming_never_splits_a_multibyte_character() {
    let tokenizer = fixture_tokenizer();
    let texts = [
        "café naïve 你好 🙂🚀 Straße",
        "emoji 🌧️☔ and a family 👩\u{200d}👩\u{200d}👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "你好，世界！我很好，谢谢。",
    ];
    for text in texts {
        let ids = tokenizer
            .inner()
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        let (pieces, held) = stream_pieces(&tokenizer, &ids);
        assert_eq!(pieces.concat(), text);
        for piece in &pieces {
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?}");
        }
        // The BPE splits these characters across byte tokens: some ids must have been held back.
        assert!(
            held > 0,
            "{text:?}: no id was held back, the test proves nothing"
        );
    }
}

#[test]
fn streaming_random_ids_matches_decode() {
    let tokenizer = fixture_tokenizer();
    let vocab = tokenizer.vocab_size() as u64;
    // A fixed linear congruential stream: ids of every kind, byte tokens and specials included.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for length in [1usize, 2, 7, 40, 300] {
        for _ in 0..20 {
            let ids: Vec<u32> = (0..length)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % vocab) as u32
                })
                .collect();
            let (pieces, _) = stream_pieces(&tokenizer, &ids);
            assert_eq!(pieces.concat(), tokenizer.decode(&ids).unwrap(), "{ids:?}");
        }
    }
}

#[test]
fn finish_flushes_an_incomplete_character_as_decode_shows_it() {
    let tokenizer = fixture_tokenizer();
    let ids = tokenizer
        .inner()
        .encode("🚀", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(ids.len() > 1, "🚀 should span several byte tokens: {ids:?}");
    let cut = &ids[..ids.len() - 1];
    let mut stream = tokenizer.stream();
    for &id in cut {
        assert_eq!(stream.push(id).unwrap(), None);
    }
    let rest = stream.finish().unwrap().expect("held bytes are flushed");
    assert_eq!(rest, tokenizer.decode(cut).unwrap());
    assert!(rest.contains('\u{FFFD}'));
    assert_eq!(stream.finish().unwrap(), None);
}

#[test]
fn chat_format_is_detected_from_template_or_architecture() {
    assert_eq!(fixture_tokenizer().chat_format(), ChatFormat::Glm4);
    let glm41v_template = "[gMASK]<sop>{%- for msg in messages %}...{%- endfor %}\n\
                           {% if add_generation_prompt %}<|assistant|>\n{% endif %}";
    assert_eq!(
        ChatFormat::from_template(glm41v_template),
        Some(ChatFormat::Glm41V)
    );
    assert_eq!(
        ChatFormat::from_template(
            "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}"
        ),
        None
    );

    let tokenizer_json = fixture_dir().join("tokenizer.json");
    let with_files = |files: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&tokenizer_json, dir.path().join("tokenizer.json")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let format = GlmTokenizer::from_dir(dir.path()).unwrap().chat_format();
        (dir, format)
    };
    let vision_config =
        r#"{"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v"}"#;
    let text_config = r#"{"architectures": ["Glm4ForCausalLM"], "model_type": "glm4"}"#;
    assert_eq!(with_files(&[]).1, ChatFormat::Glm4);
    assert_eq!(
        with_files(&[("config.json", vision_config)]).1,
        ChatFormat::Glm41V
    );
    assert_eq!(
        with_files(&[("config.json", text_config)]).1,
        ChatFormat::Glm4
    );
    assert_eq!(
        with_files(&[
            ("chat_template.jinja", glm41v_template),
            ("config.json", text_config)
        ])
        .1,
        ChatFormat::Glm41V
    );
    let fixture_template =
        std::fs::read_to_string(fixture_dir().join("chat_template.jinja")).unwrap();
    assert_eq!(
        with_files(&[
            ("chat_template.jinja", &fixture_template),
            ("config.json", vision_config)
        ])
        .1,
        ChatFormat::Glm4
    );
    // Older transformers keep the template in tokenizer_config.json, as a string or as named templates.
    let as_string = serde_json::json!({ "chat_template": glm41v_template }).to_string();
    assert_eq!(
        with_files(&[("tokenizer_config.json", &as_string)]).1,
        ChatFormat::Glm41V
    );
    let as_list = serde_json::json!({ "chat_template": [
        { "name": "tool_use", "template": "unrelated" },
        { "name": "default", "template": glm41v_template },
    ]})
    .to_string();
    assert_eq!(
        with_files(&[("tokenizer_config.json", &as_list)]).1,
        ChatFormat::Glm41V
    );
}

#[test]
fn missing_or_corrupt_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = GlmTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFile { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("tokenizer.json") && message.contains(&dir.path().display().to_string())
    );

    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": 3",
    )
    .unwrap();
    let err = GlmTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::CorruptTokenizer { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"));

    std::fs::copy(
        fixture_dir().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = GlmTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::CorruptJson { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"));
}

#[test]
fn a_tokenizer_without_glm_special_tokens_is_refused() {
    let text = std::fs::read_to_string(fixture_dir().join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    added.retain(|t| t["content"] != "<|observation|>");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let err = GlmTokenizer::from_file(&path, ChatFormat::Glm4).unwrap_err();
    match &err {
        TokenizerError::MissingSpecialToken { token, .. } => assert_eq!(*token, "<|observation|>"),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("<|observation|>"));
}

#[test]
fn empty_prompts_are_refused() {
    let tokenizer = fixture_tokenizer();
    let empty = |r: Result<Vec<u32>, TokenizerError>| matches!(r, Err(TokenizerError::EmptyPrompt));
    assert!(empty(tokenizer.encode_prompt(None, "")));
    assert!(empty(tokenizer.encode_prompt(Some("system text"), " \n\t")));
    assert!(empty(tokenizer.encode_raw("")));
    assert!(empty(tokenizer.encode_raw("\n")));
    assert!(empty(tokenizer.encode_chat(&[])));
    assert!(empty(
        tokenizer.encode_chat(&[ChatMessage::system("only a system prompt")])
    ));
    assert!(empty(
        tokenizer.encode_chat(&[ChatMessage::assistant("no user")])
    ));
    assert!(tokenizer
        .encode_raw("")
        .unwrap_err()
        .to_string()
        .contains("empty prompt"));
}
