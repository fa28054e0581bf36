//! The tokenizer against `tokenizers`/transformers references, and chat templates against
//! transformers' `apply_chat_template`.
//!
//! References: `tests/fixtures/tokenizer/tokenizer_expected.json` (from
//! `../shared/fixtures/_generator/gen_tokenizer.py`) and `tests/fixtures/chat_template/expected.json`
//! (regenerate with `python tests/fixtures/chat_template/gen_chat_template.py`).

mod common;

use common::fixtures;
use ember_model::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;

fn read_json(path: std::path::PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn ids_tokens_offsets_and_round_trips_match_reference() {
    let dir = fixtures().join("tokenizer");
    let tokenizer = Tokenizer::from_dir(&dir.join("hf")).unwrap();
    let expected = read_json(dir.join("tokenizer_expected.json"));
    assert_eq!(
        tokenizer.vocab_size(),
        expected["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tokenizer.bos_token.as_deref(), Some("<s>"));
    assert_eq!(tokenizer.eos_token.as_deref(), Some("</s>"));
    for (token, id) in expected["special_tokens"].as_object().unwrap() {
        assert_eq!(
            tokenizer.token_to_id(token),
            Some(id.as_u64().unwrap() as u32),
            "{token}"
        );
    }
    let samples = expected["samples"].as_array().unwrap();
    assert!(samples.len() >= 5);
    for sample in samples {
        let text = sample["text"].as_str().unwrap();
        let encoding = tokenizer.encode_full(text, false).unwrap();
        let ids: Vec<u64> = encoding.get_ids().iter().map(|&i| i as u64).collect();
        let want: Vec<u64> = sample["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, want, "ids of {text:?}");
        let hf_fast: Vec<u64> = sample["hf_fast_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, hf_fast, "transformers fast ids of {text:?}");
        let tokens: Vec<&str> = sample["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(encoding.get_tokens(), tokens.as_slice(), "tokens of {text:?}");
        let offsets: Vec<(usize, usize)> = sample["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize))
            .collect();
        assert_eq!(Tokenizer::char_offsets(text, &encoding), offsets, "offsets of {text:?}");
        let decoded = tokenizer.decode(encoding.get_ids(), false).unwrap();
        assert_eq!(decoded, sample["decoded"].as_str().unwrap());
        assert_eq!(
            decoded == text,
            sample["roundtrip"].as_bool().unwrap(),
            "round trip of {text:?}"
        );
    }
}

#[test]
fn chat_templates_render_as_transformers_does() {
    let expected = read_json(fixtures().join("chat_template/expected.json"));
    let conversations: Vec<Vec<ChatMessage>> = serde_json::from_value(expected["conversations"].clone()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 18);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let template = ChatTemplate::new(
            expected["templates"][name].as_str().unwrap(),
            expected["bos_token"].as_str().unwrap(),
            expected["eos_token"].as_str().unwrap(),
        );
        let messages = &conversations[case["conversation"].as_u64().unwrap() as usize];
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(messages, add).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "template {name}, conversation {}, add_generation_prompt {add}",
            case["conversation"]
        );
    }
}

#[test]
fn chat_template_is_read_from_tokenizer_config() {
    let dir = tempdir("chat_template_config");
    let src = fixtures().join("tokenizer/hf");
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let expected = read_json(fixtures().join("chat_template/expected.json"));
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": expected["templates"]["smollm2"],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tokenizer.bos_token.as_deref(), Some("<s>"));
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let text = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, expected["cases"][1]["text"].as_str().unwrap());

    let no_template = Tokenizer::from_dir(&src).unwrap();
    let err = no_template
        .apply_chat_template(&messages, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn raise_exception_in_template_is_an_error() {
    let template = ChatTemplate::new("{{ raise_exception('only user turns') }}", "", "");
    let err = template.render(&[], false).unwrap_err().to_string();
    assert!(err.contains("only user turns"), "{err}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
