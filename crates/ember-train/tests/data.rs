//! Data: reading every file format, prompt masking by format, eos handling, length policies,
//! bad rows, packing.

mod common;

use common::*;
use ember_model::Tokenizer;
use ember_train::config::{BadRows, DataConfig, DataFormat, FieldMap, Overlong};
use ember_train::data::{collate, read_records, rows, Encoder, Record, Sample, IGNORE};

fn data_config(format: DataFormat) -> DataConfig {
    serde_yaml::from_str::<DataConfig>(&format!(
        "train: x\nformat: {}\n",
        serde_json::to_value(format).unwrap().as_str().unwrap()
    ))
    .unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&model_dir("tok")).unwrap()
}

fn targets(s: &Sample) -> Vec<u32> {
    s.input_ids
        .iter()
        .zip(&s.labels)
        .filter(|(_, &l)| l != IGNORE)
        .map(|(&i, _)| i)
        .collect()
}

#[test]
fn alpaca_trains_exactly_the_response_and_eos() {
    let tok = tokenizer();
    let config = data_config(DataFormat::Alpaca);
    let enc = Encoder::new(&tok, &config, None).unwrap();
    assert_eq!(enc.eos_id, 2);
    let record = Record::Alpaca {
        instruction: "Classify.".into(),
        input: "Buy now".into(),
        output: "spam".into(),
    };
    let (s, _) = enc.encode(&record).unwrap().unwrap();
    let mut want = tok.encode("spam", false).unwrap();
    want.push(2);
    assert_eq!(targets(&s), want, "response tokens + eos");
    assert_eq!(*s.input_ids.last().unwrap(), 2);
    let prompt = ember_train::data::alpaca_prompt("Classify.", "Buy now");
    let mut full = tok.encode(&format!("{prompt}spam"), true).unwrap();
    full.push(2);
    assert_eq!(s.input_ids, full);

    // train_on_inputs: every token is a target.
    let config = DataConfig {
        train_on_inputs: true,
        ..config
    };
    let enc = Encoder::new(&tok, &config, None).unwrap();
    let (s, _) = enc.encode(&record).unwrap().unwrap();
    assert!(s.labels.iter().all(|&l| l != IGNORE));
}

#[test]
fn chat_trains_assistant_turns_only() {
    let tok = tokenizer();
    let config = data_config(DataFormat::Chat);
    let enc = Encoder::new(&tok, &config, None).unwrap();
    let messages = vec![
        ember_model::ChatMessage::new("system", "Reply spam or ham."),
        ember_model::ChatMessage::new("user", "Buy now"),
        ember_model::ChatMessage::new("assistant", "spam"),
    ];
    let (s, _) = enc
        .encode(&Record::Chat {
            messages: messages.clone(),
        })
        .unwrap()
        .unwrap();
    // The template's assistant span is "spam<|im_end|>\n"; this tokenizer has no <|im_end|>
    // token, so the eos </s> is appended and trained too.
    let mut want = tok.encode("spam<|im_end|>\n", false).unwrap();
    want.push(2);
    assert_eq!(targets(&s), want);
    let rendered = tok.apply_chat_template(&messages, false).unwrap();
    let mut full = tok.encode(&rendered, false).unwrap();
    full.push(2);
    assert_eq!(s.input_ids, full);

    // Two assistant turns: both train, user turns do not.
    let multi = vec![
        ember_model::ChatMessage::new("user", "Hi"),
        ember_model::ChatMessage::new("assistant", "Hello"),
        ember_model::ChatMessage::new("user", "Bye"),
        ember_model::ChatMessage::new("assistant", "Ciao"),
    ];
    let (s, _) = enc.encode(&Record::Chat { messages: multi }).unwrap().unwrap();
    let mut want = tok.encode("Hello<|im_end|>\n", false).unwrap();
    want.extend(tok.encode("Ciao<|im_end|>\n", false).unwrap());
    want.push(2);
    assert_eq!(targets(&s), want);
}

#[test]
fn eos_is_trained_even_when_pad_equals_eos() {
    let tok = tokenizer();
    let config = data_config(DataFormat::Completion);
    let enc = Encoder::new(&tok, &config, None).unwrap();
    let (s, _) = enc
        .encode(&Record::Completion {
            text: "Readability counts.".into(),
        })
        .unwrap()
        .unwrap();
    assert_eq!(*s.labels.last().unwrap(), 2);
    // Collate with pad id = eos id: the real eos keeps its label, padding does not train.
    let short = Sample {
        input_ids: vec![1, 40, 2],
        labels: vec![1, 40, 2],
    };
    let batch = collate(&[vec![&s], vec![&short]], 2);
    let seq = batch.dims[1];
    assert_eq!(batch.labels[seq + 2], 2, "eos label kept");
    assert!(batch.labels[seq + 3..].iter().all(|&l| l == IGNORE), "pads ignored");
    assert_eq!(batch.attention_mask[seq + 2], 1);
    assert_eq!(batch.attention_mask[seq + 3], 0);
}

#[test]
fn overlong_samples_are_dropped_or_truncated_and_counted() {
    let tok = tokenizer();
    let mut config = data_config(DataFormat::Completion);
    config.max_seq_len = 8;
    let records = vec![
        Record::Completion {
            text: "In the face of ambiguity, refuse the temptation to guess.".into(),
        },
        Record::Completion { text: "Hi.".into() },
    ];
    let enc = Encoder::new(&tok, &config, None).unwrap();
    let (samples, stats) = ember_train::data::encode_records(&records, &enc, 0).unwrap();
    assert_eq!((samples.len(), stats.dropped_overlong), (1, 1));
    config.overlong = Overlong::Truncate;
    let enc = Encoder::new(&tok, &config, None).unwrap();
    let (samples, stats) = ember_train::data::encode_records(&records, &enc, 0).unwrap();
    assert_eq!((samples.len(), stats.truncated), (2, 1));
    assert_eq!(samples[0].input_ids.len(), 8);
}

#[test]
fn every_file_format_reads_the_same_rows() {
    let spam = fixtures().join("../../datasets/spam");
    let fields = FieldMap::default();
    let (alpaca, _) = read_records(
        &spam.join("test.alpaca.jsonl"),
        DataFormat::Alpaca,
        &fields,
        BadRows::Error,
    )
    .unwrap();
    assert_eq!(alpaca.len(), 400);
    let (chat, _) = read_records(&spam.join("test.chat.jsonl"), DataFormat::Chat, &fields, BadRows::Error).unwrap();
    assert_eq!(chat.len(), 400);
    let Record::Chat { messages } = &chat[0] else { panic!() };
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[2].role, "assistant");
    let Record::Alpaca { output, .. } = &alpaca[0] else {
        panic!()
    };
    assert_eq!(&messages[2].content, output);

    let mapped = FieldMap {
        text: "body".into(),
        ..FieldMap::default()
    };
    let (csv, _) = read_records(&spam.join("test.csv"), DataFormat::Completion, &mapped, BadRows::Error).unwrap();
    let (parquet, _) = read_records(
        &spam.join("test.parquet"),
        DataFormat::Completion,
        &mapped,
        BadRows::Error,
    )
    .unwrap();
    assert_eq!(csv.len(), 400);
    assert_eq!(csv, parquet, "CSV and Parquet hold the same rows in the same order");
}

#[test]
fn malformed_rows_name_file_and_row_or_are_skipped() {
    let dir = tempdir("badrows");
    let path = dir.join("bad.jsonl");
    write(&path, "{\"text\": \"ok\"}\n{\"text\": null}\n{\"text\": \"fine\"}\n");
    let err = read_records(&path, DataFormat::Completion, &FieldMap::default(), BadRows::Error)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.jsonl") && err.contains("row 2"), "{err}");
    let (records, skipped) = read_records(&path, DataFormat::Completion, &FieldMap::default(), BadRows::Skip).unwrap();
    assert_eq!((records.len(), skipped), (2, 1));

    let err = read_records(&path, DataFormat::Alpaca, &FieldMap::default(), BadRows::Error)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no column `instruction`") && err.contains("text"), "{err}");
    let err = read_records(
        &dir.join("missing.jsonl"),
        DataFormat::Completion,
        &FieldMap::default(),
        BadRows::Error,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing.jsonl") && err.contains("not found"), "{err}");
    write(&dir.join("empty.jsonl"), "");
    let err = read_records(
        &dir.join("empty.jsonl"),
        DataFormat::Completion,
        &FieldMap::default(),
        BadRows::Error,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("empty.jsonl"), "{err}");
    write(&dir.join("garbage.jsonl"), "{\"text\": \"ok\"}\nnot json at all\n");
    let err = read_records(
        &dir.join("garbage.jsonl"),
        DataFormat::Completion,
        &FieldMap::default(),
        BadRows::Error,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("garbage.jsonl"), "{err}");
}

#[test]
fn pretokenized_rows_keep_their_labels() {
    let dir = tempdir("tokens");
    let path = dir.join("tok.jsonl");
    write(&path, "{\"input_ids\": [1, 40, 41, 2], \"labels\": [-100, -100, 41, 2]}\n{\"input_ids\": [1, 5, 6], \"labels\": [1, 5]}\n");
    let err = read_records(&path, DataFormat::Tokens, &FieldMap::default(), BadRows::Error)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 2") && err.contains("labels"), "{err}");
    let (records, _) = read_records(&path, DataFormat::Tokens, &FieldMap::default(), BadRows::Skip).unwrap();
    let tok = tokenizer();
    let enc = Encoder::new(&tok, &data_config(DataFormat::Tokens), None).unwrap();
    let (s, _) = enc.encode(&records[0]).unwrap().unwrap();
    assert_eq!(s.labels, vec![-100, -100, 41, 2]);
}

#[test]
fn packing_keeps_samples_apart() {
    let a = Sample {
        input_ids: vec![1, 10, 11],
        labels: vec![1, 10, 11],
    };
    let b = Sample {
        input_ids: vec![1, 20, 21, 22],
        labels: vec![1, 20, 21, 22],
    };
    let c = Sample {
        input_ids: vec![1, 30],
        labels: vec![1, 30],
    };
    let packed = rows(&[&a, &b, &c], true, 8);
    assert_eq!(packed.len(), 2, "a+b fit in 8 tokens, c starts a new row");
    let batch = collate(&packed, 0);
    assert_eq!(batch.dims, [2, 7]);
    assert_eq!(batch.position_ids[..7], [0, 1, 2, 0, 1, 2, 3]);
    assert_eq!(batch.segment_ids.as_ref().unwrap()[..7], [1, 1, 1, 2, 2, 2, 2]);
    // The first token of b is not a target of a's last token.
    assert_eq!(batch.labels[3], IGNORE);
    assert_eq!(batch.target_tokens, 2 + 3 + 1);
}
