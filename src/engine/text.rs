//! Turning token bytes into text a client may see: incremental UTF-8 assembly and stop
//! strings that may span tokens. Both are pure and run once per sampled token.

/// Assembles UTF-8 text from token byte pieces that may split a character.
///
/// Hand-rolled on top of `std::str::from_utf8` because the standard library already gives
/// the exact split point (`valid_up_to`, `error_len`); a full encoding crate would add
/// nothing for a single encoding.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes and returns every complete character now available. Bytes that can
    /// never become valid UTF-8 turn into U+FFFD; an incomplete tail waits for more.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // SAFETY-free: from_utf8 just told us this range is valid.
                    out.push_str(std::str::from_utf8(&self.pending[start..valid]).unwrap_or(""));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: a dangling partial character becomes U+FFFD.
    pub(crate) fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        self.pending.clear();
        char::REPLACEMENT_CHARACTER.to_string()
    }
}

/// Holds back text that could be the start of a stop string, and cuts the output at the
/// first complete one, so a stop string never reaches the client even when it arrives
/// split over several tokens.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// The result of feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StopScan {
    /// Text that is safe to emit now (may be empty while a possible stop is held).
    Emit(String),
    /// A stop string matched: emit this text, then end the generation.
    Stopped(String),
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Feeds the next piece of text.
    pub(crate) fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Emit(text.to_owned());
        }
        self.held.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return StopScan::Stopped(out);
        }
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopScan::Emit(out)
    }

    /// Releases held text when generation ends for another reason.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopMatcher {
        StopMatcher::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn multibyte_character_split_across_tokens_is_emitted_whole() {
        let mut u = Utf8Stream::default();
        let snow = "é☃".as_bytes();
        assert_eq!(u.push(&snow[..1]), "");
        assert_eq!(u.push(&snow[1..3]), "é");
        assert_eq!(u.push(&snow[3..]), "☃");
        assert_eq!(u.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_without_stalling() {
        let mut u = Utf8Stream::default();
        assert_eq!(u.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(u.push(b"\xe2\x98"), "");
        assert_eq!(u.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_inside_one_piece_cuts_there() {
        let mut m = stops(&["END"]);
        assert_eq!(
            m.push("hello END world"),
            StopScan::Stopped("hello ".into())
        );
    }

    #[test]
    fn stop_string_spanning_pieces_never_leaks() {
        let mut m = stops(&["</answer>"]);
        assert_eq!(m.push("42</"), StopScan::Emit("42".into()));
        assert_eq!(m.push("ans"), StopScan::Emit("".into()));
        assert_eq!(m.push("wer>tail"), StopScan::Stopped("".into()));
    }

    #[test]
    fn held_prefix_is_released_when_it_stops_matching() {
        let mut m = stops(&["STOP"]);
        assert_eq!(m.push("ST"), StopScan::Emit("".into()));
        assert_eq!(m.push("AY"), StopScan::Emit("STAY".into()));
        assert_eq!(m.push("S"), StopScan::Emit("".into()));
        assert_eq!(m.finish(), "S");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = stops(&["world", "lo"]);
        assert_eq!(m.push("hello world"), StopScan::Stopped("hel".into()));
    }

    #[test]
    fn no_stops_passes_text_through() {
        let mut m = stops(&[]);
        assert_eq!(m.push("abc"), StopScan::Emit("abc".into()));
    }

    #[test]
    fn partial_match_respects_char_boundaries() {
        let mut m = stops(&["éx"]);
        assert_eq!(m.push("aé"), StopScan::Emit("a".into()));
        assert_eq!(m.push("y"), StopScan::Emit("éy".into()));
    }
}
