//! A streaming reader of `multipart/related` bodies (RFC 2046 §5.1), as STOW-RS requests and
//! WADO-RS responses carry DICOM instances. It reports each part's headers and its bytes as they
//! arrive, keeping only a delimiter's length of bytes back; memory is bounded whatever the part
//! sizes. It observes: the body is forwarded unchanged by the caller.

/// Largest header block of one part.
pub const MAX_PART_HEADERS: usize = 8 * 1024;
/// Longest boundary RFC 2046 allows.
pub const MAX_BOUNDARY: usize = 70;
/// Longest transport padding (spaces, tabs) accepted after a delimiter.
pub const MAX_PADDING: usize = 1024;

/// What the reader found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part<'a> {
    /// A part begins; its headers, names lowercased, values trimmed.
    Start(Vec<(String, String)>),
    /// Bytes of the current part's body.
    Data(&'a [u8]),
    /// The current part ended.
    End,
    /// The closing delimiter was read; anything after it is the epilogue.
    Finished,
}

/// Why a body is not a well-formed multipart body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MultipartError {
    /// The boundary is empty, too long or has forbidden characters.
    #[error("boundary {0:?} is not a valid multipart boundary")]
    Boundary(String),
    /// A part's headers exceed the limit.
    #[error("part headers exceed {MAX_PART_HEADERS} bytes")]
    HeadersTooLarge,
    /// A header line is not `name: value` (its content is not repeated: it may be data).
    #[error("malformed part header line {line} ({len} bytes)")]
    Header {
        /// Line number in the part's header block, from 1.
        line: usize,
        /// Its length.
        len: usize,
    },
    /// Bytes before the first delimiter where none are allowed.
    #[error("bytes before the first boundary delimiter")]
    Preamble,
    /// Transport padding after a delimiter exceeds the limit.
    #[error("transport padding after a delimiter exceeds {MAX_PADDING} bytes")]
    Padding,
    /// Something other than CRLF or `--` follows a delimiter.
    #[error("unexpected bytes after a boundary delimiter")]
    AfterDelimiter,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter: `--` (close) or CRLF (a part follows).
    AfterDelimiter,
    /// Reading a part's header block.
    Headers,
    /// Reading a part's body.
    Body,
    /// After the closing delimiter.
    Epilogue,
}

/// The reader of one body.
#[derive(Debug)]
pub struct MultipartReader {
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
    /// Refuse a preamble (a body whose parts some other parser could see differently).
    strict: bool,
    state: State,
    buf: Vec<u8>,
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The first parameter `name` of a `Content-Type` value, unquoted.
pub fn param<'a>(content_type: &'a str, name: &str) -> Option<&'a str> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// The `boundary` parameter of a `Content-Type` value, unquoted.
pub fn boundary_of(content_type: &str) -> Option<String> {
    param(content_type, "boundary").map(str::to_owned)
}

impl MultipartReader {
    /// A reader for bodies delimited by `boundary`.
    ///
    /// # Errors
    /// When the boundary is not valid.
    pub fn new(boundary: &str) -> Result<Self, MultipartError> {
        let ok = !boundary.is_empty()
            && boundary.len() <= MAX_BOUNDARY
            && boundary.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            && !boundary.ends_with(' ');
        if !ok {
            return Err(MultipartError::Boundary(
                boundary.chars().take(80).collect(),
            ));
        }
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        // The first delimiter may open the body without the leading CRLF: pretend one came.
        Ok(Self {
            delimiter,
            strict: false,
            state: State::Preamble,
            buf: b"\r\n".to_vec(),
        })
    }

    /// A reader that refuses any preamble: the body must open with its first delimiter.
    ///
    /// # Errors
    /// When the boundary is not valid.
    pub fn strict(boundary: &str) -> Result<Self, MultipartError> {
        Ok(Self {
            strict: true,
            ..Self::new(boundary)?
        })
    }

    /// Consumes `input`, reporting parts to `sink` in order.
    ///
    /// # Errors
    /// When the body is malformed; the caller stops observing (the bytes still pass).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut sink: impl FnMut(Part<'_>),
    ) -> Result<(), MultipartError> {
        let input = self.body_in_place(input, &mut sink);
        self.buf.extend_from_slice(input);
        loop {
            let progressed = match self.state {
                State::Preamble => {
                    if self.strict {
                        let n = self.buf.len().min(self.delimiter.len());
                        if self.buf[..n] != self.delimiter[..n] {
                            return Err(MultipartError::Preamble);
                        }
                    }
                    match find(&self.buf, &self.delimiter) {
                        Some(at) => {
                            self.buf.drain(..at + self.delimiter.len());
                            self.state = State::AfterDelimiter;
                            true
                        }
                        None => {
                            // Keep only what could be the start of a delimiter.
                            let keep = self.delimiter.len().saturating_sub(1).min(self.buf.len());
                            let cut = self.buf.len() - keep;
                            self.buf.drain(..cut);
                            false
                        }
                    }
                }
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        false
                    } else if self.buf.starts_with(b"--") {
                        self.buf.clear();
                        self.state = State::Epilogue;
                        sink(Part::Finished);
                        true
                    } else {
                        // Transport padding (spaces, tabs) may precede the CRLF.
                        let pad = self
                            .buf
                            .iter()
                            .take_while(|b| **b == b' ' || **b == b'\t')
                            .count();
                        if pad > MAX_PADDING {
                            return Err(MultipartError::Padding);
                        }
                        if self.buf.len() < pad + 2 {
                            false
                        } else if &self.buf[pad..pad + 2] == b"\r\n" {
                            self.buf.drain(..pad + 2);
                            self.state = State::Headers;
                            true
                        } else {
                            return Err(MultipartError::AfterDelimiter);
                        }
                    }
                }
                State::Headers => {
                    // An empty header block is just CRLF.
                    if self.buf.starts_with(b"\r\n") {
                        self.buf.drain(..2);
                        self.state = State::Body;
                        sink(Part::Start(Vec::new()));
                        true
                    } else if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                        let headers = parse_headers(&self.buf[..at])?;
                        self.buf.drain(..at + 4);
                        self.state = State::Body;
                        sink(Part::Start(headers));
                        true
                    } else if self.buf.len() > MAX_PART_HEADERS {
                        return Err(MultipartError::HeadersTooLarge);
                    } else {
                        false
                    }
                }
                State::Body => match find(&self.buf, &self.delimiter) {
                    Some(at) => {
                        if at > 0 {
                            sink(Part::Data(&self.buf[..at]));
                        }
                        sink(Part::End);
                        self.buf.drain(..at + self.delimiter.len());
                        self.state = State::AfterDelimiter;
                        true
                    }
                    None => {
                        let keep = (self.delimiter.len() - 1).min(self.buf.len());
                        let emit = self.buf.len() - keep;
                        if emit > 0 {
                            sink(Part::Data(&self.buf[..emit]));
                            self.buf.drain(..emit);
                        }
                        false
                    }
                },
                State::Epilogue => {
                    self.buf.clear();
                    false
                }
            };
            if !progressed {
                return Ok(());
            }
        }
    }
}

impl MultipartReader {
    /// Inside a part's body, reports body bytes straight from `input` instead of copying them
    /// through the buffer (the hot path: whole instances pass here). Returns what is left for
    /// the general path: nothing, or what follows a delimiter found in `input`.
    fn body_in_place<'i>(&mut self, input: &'i [u8], sink: &mut impl FnMut(Part<'_>)) -> &'i [u8] {
        let need = self.delimiter.len();
        if self.state != State::Body || input.len() < need {
            return input;
        }
        // The held bytes are shorter than a delimiter: one starting among them ends within the
        // first `need` bytes of `input`.
        let mut window = self.buf.clone();
        window.extend_from_slice(&input[..need]);
        if find(&window, &self.delimiter).is_some_and(|at| at < self.buf.len()) {
            return input;
        }
        if !self.buf.is_empty() {
            sink(Part::Data(&self.buf));
            self.buf.clear();
        }
        match find(input, &self.delimiter) {
            None => {
                let emit = input.len() - (need - 1);
                sink(Part::Data(&input[..emit]));
                self.buf.extend_from_slice(&input[emit..]);
                &[]
            }
            Some(at) => {
                if at > 0 {
                    sink(Part::Data(&input[..at]));
                }
                sink(Part::End);
                self.state = State::AfterDelimiter;
                &input[at + need..]
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    // The delimiter starts with CR: look for CRs, then compare.
    let first = needle[0];
    let mut from = 0;
    while let Some(off) = hay[from..=hay.len() - needle.len()]
        .iter()
        .position(|b| *b == first)
    {
        let at = from + off;
        if &hay[at..at + needle.len()] == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn parse_headers(block: &[u8]) -> Result<Vec<(String, String)>, MultipartError> {
    let text = String::from_utf8_lossy(block);
    let mut out = Vec::new();
    for (i, line) in text.split("\r\n").enumerate() {
        let (k, v) = line.split_once(':').ok_or(MultipartError::Header {
            line: i + 1,
            len: line.len(),
        })?;
        out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part as (headers, body).
    type Parsed = (Vec<(String, String)>, Vec<u8>);

    /// Parts as (headers, body), joined across chunks.
    fn parts(
        body: &[u8],
        boundary: &str,
        splits: &[usize],
    ) -> Result<(Vec<Parsed>, bool), MultipartError> {
        let mut r = MultipartReader::new(boundary)?;
        let mut out: Vec<Parsed> = Vec::new();
        let mut finished = false;
        let mut prev = 0;
        for &s in splits.iter().chain(std::iter::once(&body.len())) {
            r.feed(&body[prev..s], |p| match p {
                Part::Start(h) => out.push((h, Vec::new())),
                Part::Data(d) => out.last_mut().unwrap().1.extend_from_slice(d),
                Part::End => {}
                Part::Finished => finished = true,
            })?;
            prev = s;
        }
        Ok((out, finished))
    }

    fn body() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        // Part bodies that contain near-delimiters and CRLFs.
        let a: Vec<u8> =
            b"DICM\r\n--BOUNDAR not quite\r\n-\r\n--BOUNDARZ\r\n--x --BOUNDARY without CRLF before"
                .to_vec();
        let b: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut body = b"preamble to ignore\r\n--BOUNDARY\r\nContent-Type: application/dicom\r\nContent-Location: x\r\n\r\n".to_vec();
        body.extend_from_slice(&a);
        body.extend_from_slice(b"\r\n--BOUNDARY  \r\ncontent-type: application/dicom\r\n\r\n");
        body.extend_from_slice(&b);
        body.extend_from_slice(b"\r\n--BOUNDARY--\r\nepilogue");
        (body, a, b)
    }

    #[test]
    fn parts_at_every_split() {
        let (body, a, b) = body();
        let want = parts(&body, "BOUNDARY", &[]).unwrap();
        assert_eq!(want.0.len(), 2);
        assert!(want.1, "closing delimiter seen");
        assert_eq!(want.0[0].1, a);
        assert_eq!(want.0[1].1, b);
        assert_eq!(
            want.0[0].0[0],
            ("content-type".to_owned(), "application/dicom".to_owned())
        );
        for s in 0..=body.len() {
            assert_eq!(
                parts(&body, "BOUNDARY", &[s]).unwrap(),
                want,
                "split at {s}"
            );
        }
        let every: Vec<usize> = (1..body.len()).collect();
        assert_eq!(parts(&body, "BOUNDARY", &every).unwrap(), want);
        // A body that starts with the delimiter (no preamble, no leading CRLF).
        let bare = b"--b\r\n\r\nxyz\r\n--b--";
        let (p, done) = parts(bare, "b", &[]).unwrap();
        assert_eq!((p[0].1.as_slice(), done), (&b"xyz"[..], true));
    }

    #[test]
    fn boundaries_and_malformed_bodies() {
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom\"; boundary=\"abc 123\"")
                .as_deref(),
            Some("abc 123")
        );
        assert_eq!(
            boundary_of("multipart/related; boundary=xyz").as_deref(),
            Some("xyz")
        );
        assert_eq!(boundary_of("application/dicom"), None);
        assert!(MultipartReader::new("").is_err());
        assert!(MultipartReader::new(&"x".repeat(71)).is_err());
        let long = format!(
            "--b\r\n{}\r\n",
            "X-Long: ".to_owned() + &"y".repeat(MAX_PART_HEADERS)
        );
        assert_eq!(
            parts(long.as_bytes(), "b", &[]).unwrap_err(),
            MultipartError::HeadersTooLarge
        );
        assert!(matches!(
            parts(b"--b\r\nno colon here\r\n\r\nx", "b", &[]),
            Err(MultipartError::Header { .. })
        ));
        assert_eq!(
            parts(b"--bXX", "b", &[]).unwrap_err(),
            MultipartError::AfterDelimiter
        );
    }

    proptest::proptest! {
        /// Never panics, whatever the bytes and split.
        #[test]
        fn total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), split in proptest::prelude::any::<usize>()) {
            let s = if bytes.is_empty() { 0 } else { split % bytes.len() };
            let _ = parts(&bytes, "b0undary", &[s]);
        }
    }
}
