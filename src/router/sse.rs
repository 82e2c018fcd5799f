//! Reading an upstream's server-sent-events body event by event, whatever the network chunking.
//! Both upstream kinds need it: OpenAI-compatible streams (`data:` lines ending with
//! `data: [DONE]`) and Anthropic's (`event:` names with JSON `data:`).
//!
//! It follows the WHATWG event-stream rules: lines end in `\r\n`, `\n` or a lone `\r`; `data:`
//! lines of one event are joined with `\n`; `:` starts a comment (keep-alives); one space
//! after the colon is dropped; a blank line ends the event. `id:` and `retry:` are ignored:
//! they serve reconnection, and a broken upstream stream fails over instead of reconnecting.

use super::anthropic::Malformed;

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` name; `None` when the event had none (OpenAI's streams never name them).
    pub(crate) event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub(crate) data: String,
}

/// The most bytes one event may take. An upstream that sends more without a blank line is
/// not speaking SSE, and buffering it without bound would let it exhaust memory.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Incremental parser: push bytes as they arrive, take the events they complete.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// Bytes of the line not yet ended. Kept as bytes: a chunk may end inside a UTF-8
    /// character, and line ends are ASCII, so a complete line is always whole characters.
    line: Vec<u8>,
    /// The current event's name.
    event: Option<String>,
    /// The current event's data, each line followed by `\n` (the last one dropped at the end).
    data: String,
    /// The previous chunk ended with `\r`: a `\n` opening this one belongs to that line end.
    after_cr: bool,
    /// The first line has been read (a byte-order mark may open the stream).
    started: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns the events they complete, in order. `Err` when the bytes cannot
    /// be an event stream: a line that is not UTF-8, or an event over 16 MiB.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, Malformed> {
        let mut out = Vec::new();
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            rest = rest.strip_prefix(b"\n").unwrap_or(rest);
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            self.check_size()?;
            let ended_by_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if ended_by_cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.line_done(&line)? {
                out.push(event);
            }
        }
        self.line.extend_from_slice(rest);
        self.check_size()?;
        Ok(out)
    }

    /// Whether part of an event is buffered. A stream that ends here was cut short: the rules
    /// say such an event is dropped, and the router should treat the reply as broken.
    pub(crate) fn has_partial(&self) -> bool {
        !self.line.is_empty() || !self.data.is_empty() || self.event.is_some()
    }

    fn check_size(&self) -> Result<(), Malformed> {
        if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(Malformed::new(
                "an event-stream event is larger than 16 MiB",
            ));
        }
        Ok(())
    }

    fn line_done(&mut self, raw: &[u8]) -> Result<Option<SseEvent>, Malformed> {
        let mut line = std::str::from_utf8(raw)
            .map_err(|_| Malformed::new("an event-stream line is not UTF-8"))?;
        if !self.started {
            self.started = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = (!value.is_empty()).then(|| value.to_owned()),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            _ => {}
        }
        Ok(None)
    }

    /// Ends the current event. One without data is not dispatched (the rules say so; it is
    /// what a lone `event:` line followed by a blank line amounts to).
    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if self.data.is_empty() {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        Some(SseEvent { event, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: Some(event.into()),
            data: data.into(),
        }
    }

    fn unnamed(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.into(),
        }
    }

    const ANTHROPIC: &str = "event: message_start\n\
        data: {\"type\":\"message_start\"}\n\n\
        event: ping\n\
        data: {\"type\": \"ping\"}\n\n\
        event: content_block_delta\n\
        data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hé\"}}\n\n";

    #[test]
    fn an_anthropic_stream_gives_named_events_in_order() {
        let events = SseParser::new().push(ANTHROPIC.as_bytes()).unwrap();
        let names: Vec<_> = events.iter().map(|e| e.event.as_deref()).collect();
        assert_eq!(
            names,
            [
                Some("message_start"),
                Some("ping"),
                Some("content_block_delta")
            ]
        );
        assert_eq!(events[1].data, "{\"type\": \"ping\"}");
    }

    #[test]
    fn events_split_at_every_byte_boundary_come_out_the_same() {
        let whole = SseParser::new().push(ANTHROPIC.as_bytes()).unwrap();
        let bytes = ANTHROPIC.as_bytes();
        for cut in 0..bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&bytes[..cut]).unwrap();
            got.extend(p.push(&bytes[cut..]).unwrap());
            assert_eq!(got, whole, "cut at byte {cut}");
            assert!(!p.has_partial());
        }
    }

    #[test]
    fn a_stream_fed_one_byte_at_a_time_with_crlf_line_ends_still_parses() {
        let text = "data: {\"a\":1}\r\n\r\n: keep-alive\r\n\r\ndata: [DONE]\r\n\r\n";
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in text.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, [unnamed("{\"a\":1}"), unnamed("[DONE]")]);
    }

    #[test]
    fn lone_carriage_returns_end_lines_too() {
        let got = SseParser::new()
            .push(b"event: ping\rdata: x\r\rdata: y\r\r")
            .unwrap();
        assert_eq!(got, [named("ping", "x"), unnamed("y")]);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let got = SseParser::new()
            .push(b"data: first\ndata:second\ndata:  third\n\n")
            .unwrap();
        assert_eq!(got, [unnamed("first\nsecond\n third")]);
    }

    #[test]
    fn comments_ids_retries_and_unknown_fields_are_ignored() {
        let got = SseParser::new()
            .push(b": OPENROUTER PROCESSING\nid: 7\nretry: 100\nfoo: bar\ndata: ok\n\n")
            .unwrap();
        assert_eq!(got, [unnamed("ok")]);
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_its_name_does_not_leak() {
        let got = SseParser::new()
            .push(b"event: lonely\n\ndata: next\n\n")
            .unwrap();
        assert_eq!(got, [unnamed("next")]);
    }

    #[test]
    fn an_empty_data_line_is_an_event_with_empty_data() {
        let got = SseParser::new().push(b"data:\n\n").unwrap();
        assert_eq!(got, [unnamed("")]);
    }

    #[test]
    fn a_byte_order_mark_opening_the_stream_is_skipped() {
        let got = SseParser::new()
            .push("\u{feff}data: x\n\n".as_bytes())
            .unwrap();
        assert_eq!(got, [unnamed("x")]);
    }

    #[test]
    fn a_multibyte_character_split_across_chunks_survives() {
        let text = "data: naïve café\n\n".as_bytes();
        let split = text.iter().position(|&b| b == 0xC3).unwrap() + 1;
        let mut p = SseParser::new();
        assert!(p.push(&text[..split]).unwrap().is_empty());
        assert_eq!(p.push(&text[split..]).unwrap(), [unnamed("naïve café")]);
    }

    #[test]
    fn a_stream_cut_mid_event_reports_a_partial_event() {
        let mut p = SseParser::new();
        assert!(p
            .push(b"event: content_block_delta\ndata: {\"ty")
            .unwrap()
            .is_empty());
        assert!(p.has_partial());
    }

    #[test]
    fn bytes_that_are_not_utf8_are_malformed() {
        assert!(SseParser::new().push(b"data: \xff\xfe\n\n").is_err());
    }

    #[test]
    fn an_endless_line_is_refused_instead_of_buffered() {
        let mut p = SseParser::new();
        let chunk = vec![b'a'; 1024 * 1024];
        let mut failed = false;
        for _ in 0..17 {
            if p.push(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
