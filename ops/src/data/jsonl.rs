//! Line-oriented readers and a JSONL writer.
//!
//! [`RawLines`] yields each non-blank line's bytes (without the `\n`) with its
//! 1-based line number; [`JsonlReader`] parses those lines into `T`. A line
//! that fails to parse is an item (`(line, Err(..))`), not the end of the
//! iteration, so callers decide whether a bad line is fatal. An I/O error is
//! yielded once and ends the iteration.
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A file-level failure: the file cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {source}", path.display())]
    Read {
        path: PathBuf,
        line: usize,
        source: io::Error,
    },
}

/// Why one line could not be turned into a record.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Reading failed; the iteration ends after this item.
    #[error("read error: {0}")]
    Io(#[from] io::Error),
    #[error("not valid UTF-8")]
    Utf8,
    /// Invalid JSON, or JSON that does not fit the record type.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// Opens `path` for [`RawLines`].
pub fn read_lines(path: &Path) -> Result<RawLines<BufReader<File>>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(RawLines::new(BufReader::new(file)))
}

/// Opens `path` for [`JsonlReader`].
pub fn read_jsonl<T: DeserializeOwned>(
    path: &Path,
) -> Result<JsonlReader<BufReader<File>, T>, DataError> {
    Ok(JsonlReader::new(read_lines(path)?))
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The non-blank lines of a reader, as bytes without their `\n` (and
/// without a UTF-8 byte-order mark at the start).
pub struct RawLines<R> {
    reader: R,
    line: usize,
    done: bool,
}

impl<R: BufRead> RawLines<R> {
    pub fn new(reader: R) -> Self {
        RawLines {
            reader,
            line: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for RawLines<R> {
    type Item = (usize, Result<Vec<u8>, io::Error>);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let mut buf = Vec::new();
            self.line += 1;
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    // Windows editors start UTF-8 files with a byte-order
                    // mark; left in, it made line 1 a bad JSON line.
                    if self.line == 1 && buf.starts_with(UTF8_BOM) {
                        buf.drain(..UTF8_BOM.len());
                    }
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some((self.line, Ok(buf)));
                }
                Err(err) => {
                    self.done = true;
                    return Some((self.line, Err(err)));
                }
            }
        }
        None
    }
}

/// Parses each non-blank line as a `T`.
pub struct JsonlReader<R, T> {
    lines: RawLines<R>,
    _record: PhantomData<fn() -> T>,
}

impl<R: BufRead, T: DeserializeOwned> JsonlReader<R, T> {
    pub fn new(lines: RawLines<R>) -> Self {
        JsonlReader {
            lines,
            _record: PhantomData,
        }
    }
}

impl<R: BufRead, T: DeserializeOwned> Iterator for JsonlReader<R, T> {
    type Item = (usize, Result<T, LineError>);

    fn next(&mut self) -> Option<Self::Item> {
        let (line, bytes) = self.lines.next()?;
        let record = bytes.map_err(LineError::from).and_then(|bytes| {
            let text = std::str::from_utf8(&bytes).map_err(|_| LineError::Utf8)?;
            Ok(serde_json::from_str(text)?)
        });
        Some((line, record))
    }
}

/// Writes records or raw lines to a file, one per line.
pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
    lines: u64,
}

impl JsonlWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, DataError> {
        let file = File::create(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(JsonlWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            lines: 0,
        })
    }

    /// Appends `record` as one line of compact JSON.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<(), DataError> {
        let result = serde_json::to_writer(&mut self.out, record).map_err(io::Error::from);
        result
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|source| self.error(source))?;
        self.lines += 1;
        Ok(())
    }

    /// Appends `line` as is, plus `\n`.
    pub fn write_raw(&mut self, line: &[u8]) -> Result<(), DataError> {
        let result = self
            .out
            .write_all(line)
            .and_then(|()| self.out.write_all(b"\n"));
        result.map_err(|source| self.error(source))?;
        self.lines += 1;
        Ok(())
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Flushes and fsyncs; returns the number of lines written.
    pub fn finish(mut self) -> Result<u64, DataError> {
        self.out.flush().map_err(|source| self.error(source))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|source| self.error(source))?;
        Ok(self.lines)
    }

    fn error(&self, source: io::Error) -> DataError {
        DataError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::PromptRecord;

    #[test]
    fn raw_lines_skip_blanks_and_keep_numbers() {
        let text = b"a\n\n  \nb\r\nc";
        let lines: Vec<_> = RawLines::new(&text[..])
            .map(|(n, l)| (n, l.unwrap()))
            .collect();
        assert_eq!(
            lines,
            vec![(1, b"a".to_vec()), (4, b"b\r".to_vec()), (5, b"c".to_vec())]
        );
    }

    #[test]
    fn a_byte_order_mark_does_not_spoil_line_one() {
        let text = b"\xEF\xBB\xBF{\"prompt\": \"hi\"}\n{\"prompt\": \"\xEF\xBB\xBFyo\"}\n";
        let items: Vec<(usize, Result<PromptRecord, LineError>)> =
            JsonlReader::new(RawLines::new(&text[..])).collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].1.as_ref().unwrap().prompt, "hi");
        // Only the file's first bytes are a mark; inside a line it is text.
        assert_eq!(items[1].1.as_ref().unwrap().prompt, "\u{feff}yo");
    }

    #[test]
    fn jsonl_reader_reports_bad_lines_and_goes_on() {
        let text = b"{\"prompt\": \"hi\"}\nnot json\n{\"other\": 1}\n\xff\n{\"prompt\": \"yo\"}\n";
        let items: Vec<(usize, Result<PromptRecord, LineError>)> =
            JsonlReader::new(RawLines::new(&text[..])).collect();
        assert_eq!(items.len(), 5);
        assert_eq!(items[0].1.as_ref().unwrap().prompt, "hi");
        assert!(matches!(items[1], (2, Err(LineError::Json(_)))));
        let missing = items[2].1.as_ref().unwrap_err().to_string();
        assert!(missing.contains("missing field `prompt`"), "{missing}");
        assert!(matches!(items[3], (4, Err(LineError::Utf8))));
        assert_eq!(items[4].0, 5);
    }

    #[test]
    fn writer_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut w = JsonlWriter::create(&path).unwrap();
        w.write(&PromptRecord {
            prompt: "a\nb".into(),
        })
        .unwrap();
        w.write_raw(b"{\"prompt\":\"c\"}").unwrap();
        assert_eq!(w.finish().unwrap(), 2);
        let back: Vec<PromptRecord> = read_jsonl(&path)
            .unwrap()
            .map(|(_, r)| r.unwrap())
            .collect();
        assert_eq!(
            back,
            vec![
                PromptRecord {
                    prompt: "a\nb".into()
                },
                PromptRecord { prompt: "c".into() }
            ]
        );
    }
}
