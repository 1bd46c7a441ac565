//! Server-sent events, read incrementally: the provider's stream is cut into whole events as
//! bytes arrive, so each event is judged before it is relayed, and relayed as it came.

use bytes::Bytes;

/// One event: its bytes exactly as received (blank line included), its name and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub raw: Bytes,
    pub name: Option<String>,
    pub data: String,
}

/// Cuts a byte stream into events. An event longer than `limit` bytes is an error (a provider
/// cannot make the gateway buffer without bound).
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Vec<u8>,
    limit: usize,
}

impl Reader {
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
        }
    }

    /// Takes `chunk` and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Event>, String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..end).collect();
            events.push(parse(Bytes::from(raw)));
        }
        if self.buf.len() > self.limit {
            return Err(format!(
                "an event of the provider's stream exceeds {} bytes",
                self.limit
            ));
        }
        Ok(events)
    }

    /// What is left when the stream ends: an event without its closing blank line, if any.
    pub fn finish(&mut self) -> Option<Event> {
        let rest = std::mem::take(&mut self.buf);
        (!rest.iter().all(u8::is_ascii_whitespace)).then(|| parse(Bytes::from(rest)))
    }
}

/// The end (exclusive) of the first complete event in `buf`: after the first blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    let mut i = 0;
    while i < buf.len() {
        let eol = match buf[i] {
            b'\n' => 1,
            b'\r' if buf.get(i + 1) == Some(&b'\n') => 2,
            b'\r' if i + 1 < buf.len() => 1,
            // A lone CR at the end may be the first half of CRLF: wait for more.
            b'\r' => return None,
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            return Some(i + eol);
        }
        i += eol;
        line_start = i;
    }
    None
}

fn parse(raw: Bytes) -> Event {
    let text = String::from_utf8_lossy(&raw);
    let mut name = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']) {
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => name = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    let data = data.join("\n");
    Event { raw, name, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_where_they_end_whatever_the_chunks() {
        let stream =
            b"event: a\ndata: {\"x\":1}\n\ndata: two\r\ndata: lines\r\n\r\n: comment\n\ndata: tail";
        for split in 1..stream.len() {
            let mut reader = Reader::new(1024);
            let mut events = reader.push(&stream[..split]).unwrap();
            events.extend(reader.push(&stream[split..]).unwrap());
            let names: Vec<_> = events.iter().map(|e| e.name.clone()).collect();
            let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
            assert_eq!(
                names,
                [Some("a".to_owned()), None, None],
                "split at {split}"
            );
            assert_eq!(data, ["{\"x\":1}", "two\nlines", ""], "split at {split}");
            let raw: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
            assert_eq!(
                raw,
                stream[..stream.len() - 10],
                "relayed bytes are the received ones"
            );
            assert_eq!(reader.finish().unwrap().data, "tail");
        }
    }

    #[test]
    fn an_endless_event_is_an_error_not_a_buffer() {
        let mut reader = Reader::new(64);
        assert!(reader.push(&[b'a'; 32]).is_ok());
        let error = reader.push(&[b'a'; 64]).unwrap_err();
        assert!(error.contains("exceeds 64 bytes"), "{error}");
    }
}
