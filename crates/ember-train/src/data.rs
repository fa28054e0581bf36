//! Training data: files read with polars → records → tokens + labels → batches.
//!
//! Labels follow transformers' convention: `labels[t]` is the token at `t` or -100 when `t`
//! is not a target, and the loss compares the logits at `t` with `labels[t + 1]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ember_model::{ChatMessage, Tokenizer};
use polars::prelude::*;
use serde::Serialize;

use crate::config::{BadRows, DataConfig, DataFormat, FieldMap, Overlong};
use crate::error::{Result, TrainError};

/// The label of positions that do not train.
pub const IGNORE: i64 = -100;

/// One row of a data file, by format.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text.
    Completion {
        /// The text.
        text: String,
    },
    /// An Alpaca instruction record.
    Alpaca {
        /// The task.
        instruction: String,
        /// Optional context.
        input: String,
        /// The response that trains.
        output: String,
    },
    /// A conversation.
    Chat {
        /// The turns.
        messages: Vec<ChatMessage>,
    },
    /// Pre-tokenized ids with optional labels.
    Tokens {
        /// Token ids.
        input_ids: Vec<i64>,
        /// Labels (-100 = ignored); `None` = every token trains.
        labels: Option<Vec<i64>>,
    },
}

fn data_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads a JSONL/JSON, CSV or Parquet file into a polars frame. A reader that panics on a
/// malformed file (polars has such paths) is reported as an error naming the file.
pub fn read_frame(path: &Path) -> Result<DataFrame> {
    // The panic hook is process-wide: one reader at a time swaps it for a silent one.
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| read_frame_unguarded(path));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(data_err(
            path,
            format!("cannot parse: the reader failed on this file ({what})"),
        ))
    })
}

fn read_frame_unguarded(path: &Path) -> Result<DataFrame> {
    if !path.exists() {
        return Err(data_err(path, "file not found"));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let file = std::fs::File::open(path).map_err(crate::error::io(path))?;
    let polars_err = |e: PolarsError| data_err(path, format!("cannot parse: {e}"));
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => {
            // A .json file may hold one array or one object per line.
            let first = std::fs::read(path)
                .map_err(crate::error::io(path))?
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .copied();
            let format = if ext == "json" && first == Some(b'[') {
                JsonFormat::Json
            } else {
                JsonFormat::JsonLines
            };
            JsonReader::new(file)
                .with_json_format(format)
                .finish()
                .map_err(polars_err)
        }
        "csv" => CsvReadOptions::default()
            .with_has_header(true)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
            .map_err(polars_err),
        "parquet" => ParquetReader::new(file).finish().map_err(polars_err),
        other => Err(data_err(
            path,
            format!("unknown extension `.{other}` (use .jsonl, .json, .csv or .parquet)"),
        )),
    }
}

/// A column as optional strings per row.
fn strings(df: &DataFrame, name: &str, path: &Path, required: bool) -> Result<Vec<Option<String>>> {
    let Ok(column) = df.column(name) else {
        if required {
            let have: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
            return Err(data_err(
                path,
                format!("no column `{name}` (columns: {})", have.join(", ")),
            ));
        }
        return Ok(vec![None; df.height()]);
    };
    let column = column
        .cast(&DataType::String)
        .map_err(|e| data_err(path, format!("column `{name}` is not text: {e}")))?;
    let ca = column
        .str()
        .map_err(|e| data_err(path, format!("column `{name}` is not text: {e}")))?;
    Ok(ca.iter().map(|v| v.map(str::to_string)).collect())
}

/// A list-of-integers column per row.
fn int_lists(df: &DataFrame, name: &str, path: &Path, required: bool) -> Result<Vec<Option<Vec<i64>>>> {
    let Ok(column) = df.column(name) else {
        if required {
            return Err(data_err(path, format!("no column `{name}`")));
        }
        return Ok(vec![None; df.height()]);
    };
    let list = column
        .list()
        .map_err(|e| data_err(path, format!("column `{name}` is not a list of integers: {e}")))?;
    let mut out = Vec::with_capacity(df.height());
    for (row, item) in list.series_iter().enumerate() {
        out.push(match item {
            None => None,
            Some(series) => {
                let ints = series
                    .cast(&DataType::Int64)
                    .map_err(|e| data_err(path, format!("row {}: `{name}`: {e}", row + 1)))?;
                let ca = ints
                    .i64()
                    .map_err(|e| data_err(path, format!("row {}: `{name}`: {e}", row + 1)))?;
                if ca.null_count() > 0 {
                    None
                } else {
                    Some(ca.no_null_iter().collect())
                }
            }
        });
    }
    Ok(out)
}

/// A list-of-{role, content} column per row.
fn message_lists(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<Option<Vec<ChatMessage>>>> {
    let column = df
        .column(name)
        .map_err(|_| data_err(path, format!("no column `{name}`")))?;
    let list = column
        .list()
        .map_err(|e| data_err(path, format!("column `{name}` is not a list of messages: {e}")))?;
    let mut out = Vec::with_capacity(df.height());
    for item in list.series_iter() {
        let Some(series) = item else {
            out.push(None);
            continue;
        };
        let Ok(structs) = series.struct_() else {
            out.push(None);
            continue;
        };
        let field = |f: &str| -> Option<Vec<Option<String>>> {
            let s = structs.field_by_name(f).ok()?;
            let s = s.cast(&DataType::String).ok()?;
            Some(s.str().ok()?.iter().map(|v| v.map(str::to_string)).collect())
        };
        let (Some(roles), Some(contents)) = (field("role"), field("content")) else {
            out.push(None);
            continue;
        };
        let messages: Option<Vec<ChatMessage>> = roles
            .into_iter()
            .zip(contents)
            .map(|(r, c)| Some(ChatMessage::new(r?, c?)))
            .collect();
        out.push(messages.filter(|m| !m.is_empty()));
    }
    Ok(out)
}

/// Reads the records of a data file. Rows with a missing or null field are an error naming
/// the file and row (1-based), or skipped and counted when `bad_rows: skip`.
pub fn read_records(
    path: &Path,
    format: DataFormat,
    fields: &FieldMap,
    bad_rows: BadRows,
) -> Result<(Vec<Record>, usize)> {
    read_records_for_vocab(path, format, fields, bad_rows, None)
}

/// The first token id or label of `ids` that a model with `vocab_size` rows cannot embed
/// (labels may also be -100).
fn outside_vocab(ids: &[i64], vocab_size: usize, ignore_allowed: bool) -> Option<i64> {
    ids.iter()
        .copied()
        .find(|&id| !((0..vocab_size as i64).contains(&id) || (ignore_allowed && id == IGNORE)))
}

/// [`read_records`], where pre-tokenized rows must also hold ids below `vocab_size` (the
/// model's embedding rows): a row with others is a bad row.
pub fn read_records_for_vocab(
    path: &Path,
    format: DataFormat,
    fields: &FieldMap,
    bad_rows: BadRows,
    vocab_size: Option<usize>,
) -> Result<(Vec<Record>, usize)> {
    let df = read_frame(path)?;
    if df.height() == 0 {
        return Err(data_err(path, "no rows"));
    }
    let rows: Vec<std::result::Result<Record, String>> = match format {
        DataFormat::Completion => strings(&df, &fields.text, path, true)?
            .into_iter()
            .map(|t| {
                t.map(|text| Record::Completion { text })
                    .ok_or(format!("`{}` is missing or null", fields.text))
            })
            .collect(),
        DataFormat::Alpaca => {
            let ins = strings(&df, &fields.instruction, path, true)?;
            let inp = strings(&df, &fields.input, path, false)?;
            let out = strings(&df, &fields.output, path, true)?;
            ins.into_iter()
                .zip(inp)
                .zip(out)
                .map(|((i, x), o)| match (i, o) {
                    (Some(instruction), Some(output)) => Ok(Record::Alpaca {
                        instruction,
                        input: x.unwrap_or_default(),
                        output,
                    }),
                    (None, _) => Err(format!("`{}` is missing or null", fields.instruction)),
                    (_, None) => Err(format!("`{}` is missing or null", fields.output)),
                })
                .collect()
        }
        DataFormat::Chat => message_lists(&df, &fields.messages, path)?
            .into_iter()
            .map(|m| {
                m.map(|messages| Record::Chat { messages }).ok_or(format!(
                    "`{}` is not a non-empty list of {{role, content}} strings",
                    fields.messages
                ))
            })
            .collect(),
        DataFormat::Tokens => {
            let ids = int_lists(&df, &fields.input_ids, path, true)?;
            let labels = int_lists(&df, &fields.labels, path, false)?;
            let has_labels = df.column(&fields.labels).is_ok();
            ids.into_iter()
                .zip(labels)
                .map(|(i, l)| match i {
                    None => Err(format!("`{}` is missing or not a list of integers", fields.input_ids)),
                    Some(input_ids) => match (has_labels, l) {
                        (true, None) => Err(format!("`{}` is missing or not a list of integers", fields.labels)),
                        (_, Some(l)) if l.len() != input_ids.len() => Err(format!(
                            "`{}` has {} entries but `{}` has {}",
                            fields.labels,
                            l.len(),
                            fields.input_ids,
                            input_ids.len()
                        )),
                        (_, labels) => {
                            let vocab = vocab_size.unwrap_or(usize::MAX >> 1);
                            if let Some(bad) = outside_vocab(&input_ids, vocab, false) {
                                Err(format!(
                                    "`{}` holds token id {bad}, outside the model's vocabulary (0..{vocab})",
                                    fields.input_ids
                                ))
                            } else if let Some(bad) = labels.as_deref().and_then(|l| outside_vocab(l, vocab, true)) {
                                Err(format!(
                                    "`{}` holds {bad}, neither -100 nor a token id of the model's vocabulary (0..{vocab})",
                                    fields.labels
                                ))
                            } else {
                                Ok(Record::Tokens { input_ids, labels })
                            }
                        }
                    },
                })
                .collect()
        }
    };
    let mut records = Vec::with_capacity(rows.len());
    let mut skipped = 0;
    for (i, row) in rows.into_iter().enumerate() {
        match row {
            Ok(r) => records.push(r),
            Err(msg) if bad_rows == BadRows::Skip => {
                tracing::warn!("{}: row {}: {msg}; skipped", path.display(), i + 1);
                skipped += 1;
            }
            Err(msg) => return Err(data_err(path, format!("row {}: {msg}", i + 1))),
        }
    }
    if records.is_empty() {
        return Err(data_err(path, "no usable rows"));
    }
    Ok((records, skipped))
}

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// `labels[t]` = `input_ids[t]` where position `t` trains, else -100.
    pub labels: Vec<i64>,
}

impl Sample {
    /// Number of tokens the loss counts (labels after the shift).
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// The Alpaca prompt (Stanford Alpaca's template, as Axolotl uses it).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// Turns records into samples with one tokenizer and one set of rules.
pub struct Encoder<'a> {
    /// The tokenizer (and its chat template).
    pub tokenizer: &'a Tokenizer,
    /// Record layout.
    pub format: DataFormat,
    /// Longest sample.
    pub max_seq_len: usize,
    /// Train on prompts too.
    pub train_on_inputs: bool,
    /// Policy for longer samples.
    pub overlong: Overlong,
    /// The end-of-sequence id appended (and trained).
    pub eos_id: u32,
    /// Rows of the model's embedding: every token id must be below it.
    pub vocab_size: usize,
}

/// Why a record produced no sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Longer than `max_seq_len` under the `drop` policy.
    Overlong,
    /// No target token left.
    NoTargets,
}

/// Counts of what data preparation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataStats {
    /// Rows read.
    pub rows: usize,
    /// Rows skipped as unreadable.
    pub skipped_bad_rows: usize,
    /// Samples kept.
    pub samples: usize,
    /// Samples dropped for length.
    pub dropped_overlong: usize,
    /// Samples cut to `max_seq_len`.
    pub truncated: usize,
    /// Samples dropped for having no target token.
    pub dropped_no_targets: usize,
    /// Tokens in kept samples.
    pub tokens: usize,
    /// Target tokens in kept samples.
    pub target_tokens: usize,
    /// Longest kept sample.
    pub max_len: usize,
}

impl<'a> Encoder<'a> {
    /// An encoder for `config`, taking the eos id from the tokenizer config or the model config.
    pub fn new(tokenizer: &'a Tokenizer, config: &DataConfig, model_eos: Option<u32>) -> Result<Self> {
        let eos_id = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .or(model_eos)
            .ok_or_else(|| TrainError::Config("the tokenizer and config.json name no end-of-sequence token".into()))?;
        if config.format == DataFormat::Chat && tokenizer.chat_template.is_none() {
            return Err(TrainError::Config(
                "data.format is chat but the model has no chat template (tokenizer_config.json `chat_template`)".into(),
            ));
        }
        Ok(Self {
            tokenizer,
            format: config.format,
            max_seq_len: config.max_seq_len,
            train_on_inputs: config.train_on_inputs,
            overlong: config.overlong,
            eos_id,
            vocab_size: tokenizer.vocab_size(),
        })
    }

    /// Checks token ids against a model with `vocab_size` embedding rows (default: the
    /// tokenizer's vocabulary).
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        self.vocab_size = vocab_size;
        self
    }

    /// Tokenizes `text` and marks as targets the tokens that start inside `spans` (byte ranges).
    fn tokenize_spans(&self, text: &str, spans: &[(usize, usize)], add_special: bool) -> Result<Sample> {
        let enc = self.tokenizer.encode_full(text, add_special)?;
        let ids = enc.get_ids().to_vec();
        let labels = ids
            .iter()
            .zip(enc.get_offsets())
            .zip(enc.get_special_tokens_mask())
            .map(|((&id, &(start, end)), &special)| {
                // Added special tokens (BOS) have empty offsets and are never targets.
                let inside = special == 0 && end > start && spans.iter().any(|&(a, b)| start >= a && start < b);
                if self.train_on_inputs || inside {
                    id as i64
                } else {
                    IGNORE
                }
            })
            .collect();
        Ok(Sample { input_ids: ids, labels })
    }

    /// Encodes one record; `Err(Dropped)` when the policy drops it.
    pub fn encode(&self, record: &Record) -> Result<std::result::Result<(Sample, bool), Dropped>> {
        let mut sample = match record {
            Record::Completion { text } => {
                let mut s = self.tokenize_spans(text, &[(0, text.len())], true)?;
                s.labels = s.input_ids.iter().map(|&i| i as i64).collect();
                self.push_eos(&mut s);
                s
            }
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                let prompt = alpaca_prompt(instruction, input);
                let text = format!("{prompt}{output}");
                let mut s = self.tokenize_spans(&text, &[(prompt.len(), text.len())], true)?;
                self.push_eos(&mut s);
                s
            }
            Record::Chat { messages } => self.encode_chat(messages)?,
            Record::Tokens { input_ids, labels } => {
                if let Some(bad) = outside_vocab(input_ids, self.vocab_size, false) {
                    // Negative ids would wrap around in the cast below; rows from a file are
                    // checked with their row number by `read_records_for_vocab` already.
                    return Err(TrainError::Config(format!(
                        "token id {bad} is outside the model's vocabulary (0..{})",
                        self.vocab_size
                    )));
                }
                let ids: Vec<u32> = input_ids.iter().map(|&i| i as u32).collect();
                let labels = labels.clone().unwrap_or_else(|| input_ids.clone());
                Sample { input_ids: ids, labels }
            }
        };
        if let Some(&bad) = sample.input_ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TrainError::Config(format!(
                "the tokenizer gave token id {bad} ({:?}), outside the model's vocabulary (0..{}): \
                 tokenizer.json does not fit this model",
                self.tokenizer.id_to_token(bad).unwrap_or_default(),
                self.vocab_size
            )));
        }
        let mut truncated = false;
        if sample.input_ids.len() > self.max_seq_len {
            match self.overlong {
                Overlong::Drop => return Ok(Err(Dropped::Overlong)),
                Overlong::Truncate => {
                    sample.input_ids.truncate(self.max_seq_len);
                    sample.labels.truncate(self.max_seq_len);
                    truncated = true;
                }
            }
        }
        if sample.target_tokens() == 0 {
            return Ok(Err(Dropped::NoTargets));
        }
        Ok(Ok((sample, truncated)))
    }

    /// Appends a trained end-of-sequence token (also when pad == eos: labels are built here,
    /// never by masking pad ids).
    fn push_eos(&self, s: &mut Sample) {
        if s.input_ids.last() != Some(&self.eos_id) {
            s.input_ids.push(self.eos_id);
            s.labels.push(self.eos_id as i64);
        }
    }

    /// The conversation through the chat template; assistant turns (with the template's
    /// end-of-turn text) are targets. The template used here is the one eval and generation use.
    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Sample> {
        let full = self.tokenizer.apply_chat_template(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.tokenizer.apply_chat_template(&messages[..i], true)?;
            let through = self.tokenizer.apply_chat_template(&messages[..=i], false)?;
            if !full.starts_with(&before) || !full.starts_with(&through) || through.len() < before.len() {
                return Err(TrainError::Config(
                    "the chat template does not render conversations prefix by prefix; cannot find the assistant turns"
                        .into(),
                ));
            }
            spans.push((before.len(), through.len()));
        }
        let mut s = self.tokenize_spans(&full, &spans, false)?;
        // The template's own end-of-turn token is the eos of chat models (e.g. <|im_end|>);
        // append one only when the last assistant turn does not already hold it.
        let eos_text = self.tokenizer.id_to_token(self.eos_id).unwrap_or_default();
        let last_turn_has_eos = spans
            .last()
            .is_some_and(|&(a, b)| !eos_text.is_empty() && full[a..b].contains(&eos_text));
        if !last_turn_has_eos && messages.last().is_some_and(|m| m.role == "assistant") {
            s.input_ids.push(self.eos_id);
            s.labels.push(self.eos_id as i64);
        }
        Ok(s)
    }
}

/// Reads and encodes a data file, returning the kept samples and statistics.
pub fn load_samples(
    path: &Path,
    config: &DataConfig,
    encoder: &Encoder<'_>,
    max_rows: Option<usize>,
) -> Result<(Vec<Sample>, DataStats)> {
    let (mut records, skipped) = read_records_for_vocab(
        path,
        config.format,
        &config.fields,
        config.bad_rows,
        Some(encoder.vocab_size),
    )?;
    if let Some(n) = max_rows {
        records.truncate(n);
    }
    encode_records(&records, encoder, skipped)
}

/// Encodes records, counting what the policies dropped.
pub fn encode_records(records: &[Record], encoder: &Encoder<'_>, skipped: usize) -> Result<(Vec<Sample>, DataStats)> {
    let mut stats = DataStats {
        rows: records.len() + skipped,
        skipped_bad_rows: skipped,
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(records.len());
    for record in records {
        match encoder.encode(record)? {
            Ok((s, truncated)) => {
                stats.truncated += usize::from(truncated);
                stats.tokens += s.input_ids.len();
                stats.target_tokens += s.target_tokens();
                stats.max_len = stats.max_len.max(s.input_ids.len());
                samples.push(s);
            }
            Err(Dropped::Overlong) => stats.dropped_overlong += 1,
            Err(Dropped::NoTargets) => stats.dropped_no_targets += 1,
        }
    }
    stats.samples = samples.len();
    Ok((samples, stats))
}

/// A padded micro-batch on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[batch, seq]` row-major.
    pub input_ids: Vec<i64>,
    /// `[batch, seq]`, -100 at ignored positions and padding.
    pub labels: Vec<i64>,
    /// `[batch, seq]`, 1 real, 0 pad.
    pub attention_mask: Vec<i64>,
    /// `[batch, seq]`, restarting at 0 for each packed sample.
    pub position_ids: Vec<i64>,
    /// `[batch, seq]` packed-sample ids (1, 2, ...; 0 = pad) when packing, else `None`.
    pub segment_ids: Option<Vec<i64>>,
    /// `[batch, seq]`.
    pub dims: [usize; 2],
    /// Number of target tokens after the shift.
    pub target_tokens: usize,
}

/// Pads `rows` (each a list of samples packed together) into one batch.
pub fn collate(rows: &[Vec<&Sample>], pad_id: u32) -> Batch {
    let seq = rows
        .iter()
        .map(|r| r.iter().map(|s| s.input_ids.len()).sum::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let batch = rows.len();
    let packed = rows.iter().any(|r| r.len() > 1);
    let mut b = Batch {
        input_ids: vec![pad_id as i64; batch * seq],
        labels: vec![IGNORE; batch * seq],
        attention_mask: vec![0; batch * seq],
        position_ids: vec![0; batch * seq],
        segment_ids: packed.then(|| vec![0; batch * seq]),
        dims: [batch, seq],
        target_tokens: 0,
    };
    for (r, row) in rows.iter().enumerate() {
        let mut t = r * seq;
        for (k, sample) in row.iter().enumerate() {
            for (p, (&id, &label)) in sample.input_ids.iter().zip(&sample.labels).enumerate() {
                b.input_ids[t] = id as i64;
                // The first token of a sample is never a target: nothing before it is its context.
                b.labels[t] = if p == 0 { IGNORE } else { label };
                b.attention_mask[t] = 1;
                b.position_ids[t] = p as i64;
                if let Some(seg) = b.segment_ids.as_mut() {
                    seg[t] = k as i64 + 1;
                }
                t += 1;
            }
        }
    }
    b.target_tokens = (0..batch)
        .map(|r| {
            b.labels[r * seq + 1..(r + 1) * seq]
                .iter()
                .filter(|&&l| l != IGNORE)
                .count()
        })
        .sum();
    b
}

/// Groups samples (in the given order) into rows: one sample per row, or greedily packed
/// up to `max_seq_len` tokens.
pub fn rows<'s>(samples: &[&'s Sample], packing: bool, max_seq_len: usize) -> Vec<Vec<&'s Sample>> {
    if !packing {
        return samples.iter().map(|s| vec![*s]).collect();
    }
    let mut out: Vec<Vec<&Sample>> = Vec::new();
    let mut len = 0;
    for s in samples {
        let n = s.input_ids.len();
        match out.last_mut() {
            Some(row) if len + n <= max_seq_len => {
                row.push(s);
                len += n;
            }
            _ => {
                out.push(vec![s]);
                len = n;
            }
        }
    }
    out
}

/// The order of training rows in `epoch`: file order, or a shuffle seeded by (seed, epoch).
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)));
        order.shuffle(&mut rng);
    }
    order
}

/// Splits off `fraction` of the rows for evaluation after a seeded shuffle.
pub fn split_validation(samples: Vec<Sample>, fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    let order = epoch_order(samples.len(), true, seed.wrapping_add(17), 0);
    let n_eval = ((samples.len() as f64) * fraction).round().max(1.0) as usize;
    let mut slots: Vec<Option<Sample>> = samples.into_iter().map(Some).collect();
    let mut eval = Vec::new();
    let mut train = Vec::new();
    for (k, i) in order.into_iter().enumerate() {
        let s = slots[i].take().expect("each index once");
        if k < n_eval {
            eval.push(s);
        } else {
            train.push(s);
        }
    }
    (train, eval)
}

/// Token-by-token view of a few samples for `ember data preview`.
pub fn preview(tokenizer: &Tokenizer, samples: &[Sample], count: usize) -> Result<String> {
    let mut out = String::new();
    for (n, s) in samples.iter().take(count).enumerate() {
        out.push_str(&format!(
            "--- sample {n}: {} tokens, {} targets\n",
            s.input_ids.len(),
            s.target_tokens()
        ));
        for (&id, &label) in s.input_ids.iter().zip(&s.labels) {
            let piece = tokenizer.decode(&[id], false)?;
            out.push_str(&format!("{:?}({id}, {label}) ", piece));
        }
        out.push('\n');
    }
    Ok(out)
}

/// Length histogram (powers of two) for data statistics.
pub fn length_histogram(samples: &[Sample]) -> BTreeMap<usize, usize> {
    let mut h = BTreeMap::new();
    for s in samples {
        *h.entry(s.input_ids.len().next_power_of_two()).or_insert(0) += 1;
    }
    h
}

/// Resolves the evaluation file path relative to nothing (as given).
pub fn eval_path(config: &DataConfig) -> Option<PathBuf> {
    config.eval.clone()
}
