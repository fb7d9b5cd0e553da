//! Where a request message ends: the body framing of its head, tracked over
//! the bytes as they pass, so the proxy is never handed a byte of the next
//! (pipelined) request.
//!
//! Chunk-size lines are parsed with the same function Pingora's body reader
//! uses (`httparse::parse_chunk_size`), so both agree on where a chunked
//! body ends; data must be followed by CRLF, and the message ends at the
//! CRLF CRLF after the last chunk (trailers, if any, are skipped).

/// Longest chunk-size line (size, extensions and CRLF) accepted, and most
/// trailer bytes after the last chunk: Pingora's own limits, so a body
/// Pingora reads is never one whose end this module gives up on.
const MAX_CHUNK_LINE: usize = 8 * 1024;
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// The rest of the current request message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// This many body bytes remain; 0 once the message is complete.
    Length(u64),
    Chunked(Chunked),
    /// No end: an upgraded connection (a tunnel) or a body whose framing
    /// could not be followed; the connection is not reused after it.
    Unbounded,
}

/// The chunked body was malformed; its end is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl Framing {
    /// Whether the message is complete: every further byte is the next one's.
    pub fn is_done(&self) -> bool {
        match self {
            Framing::Length(n) => *n == 0,
            Framing::Chunked(c) => c.state == ChunkState::Done,
            Framing::Unbounded => false,
        }
    }

    /// How many of `bytes`, which come next on the connection, belong to
    /// the current message. The rest starts the next message.
    pub fn take(&mut self, bytes: &[u8]) -> Result<usize, Malformed> {
        match self {
            Framing::Length(n) => {
                let take = usize::try_from(*n).unwrap_or(usize::MAX).min(bytes.len());
                *n -= take as u64;
                Ok(take)
            }
            Framing::Chunked(c) => c.take(bytes),
            Framing::Unbounded => Ok(bytes.len()),
        }
    }
}

/// Progress through a chunked body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    /// The chunk-size line read so far.
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    SizeLine,
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: how much of CRLF CRLF has been matched (the
    /// last chunk's own line end counts as the first CRLF), and the bytes
    /// seen.
    Trailers {
        matched: u8,
        seen: usize,
    },
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: ChunkState::SizeLine,
            line: Vec::new(),
        }
    }
}

impl Chunked {
    fn take(&mut self, bytes: &[u8]) -> Result<usize, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::SizeLine => {
                    let rest = &bytes[i..];
                    let end = rest.iter().position(|&b| b == b'\n');
                    let upto = end.map_or(rest.len(), |e| e + 1);
                    if self.line.len() + upto > MAX_CHUNK_LINE {
                        return Err(Malformed);
                    }
                    self.line.extend_from_slice(&rest[..upto]);
                    i += upto;
                    if end.is_some() {
                        let size = match httparse::parse_chunk_size(&self.line) {
                            Ok(httparse::Status::Complete((used, size)))
                                if used == self.line.len() =>
                            {
                                size
                            }
                            _ => return Err(Malformed),
                        };
                        self.line = Vec::new();
                        self.state = if size == 0 {
                            ChunkState::Trailers {
                                matched: 2,
                                seen: 0,
                            }
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                }
                ChunkState::Data(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataCr => {
                    if bytes[i] != b'\r' {
                        return Err(Malformed);
                    }
                    i += 1;
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if bytes[i] != b'\n' {
                        return Err(Malformed);
                    }
                    i += 1;
                    self.state = ChunkState::SizeLine;
                }
                ChunkState::Trailers { matched, seen } => {
                    let b = bytes[i];
                    i += 1;
                    let matched = match (matched, b) {
                        (0 | 2, b'\r') => matched + 1,
                        (1 | 3, b'\n') => matched + 1,
                        (_, b'\r') => 1,
                        _ => 0,
                    };
                    if seen + 1 > MAX_TRAILER_BYTES {
                        return Err(Malformed);
                    }
                    self.state = if matched == 4 {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailers {
                            matched,
                            seen: seen + 1,
                        }
                    };
                }
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns how many bytes
    /// belonged to the message.
    fn feed(mut framing: Framing, input: &[u8], step: usize) -> Result<usize, Malformed> {
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = framing.take(piece)?;
            used += n;
            if n < piece.len() {
                assert!(framing.is_done());
                return Ok(used);
            }
        }
        Ok(used)
    }

    #[test]
    fn a_length_body_ends_after_its_length() {
        for step in [1, 3, 100] {
            assert_eq!(
                feed(Framing::Length(5), b"helloGET / HTTP/1.1\r\n", step),
                Ok(5)
            );
        }
        assert!(Framing::Length(0).is_done());
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_whatever_the_pieces() {
        let body = b"5\r\nhello\r\na;ext=1\r\n0123456789\r\n0\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        for step in 1..=body.len() + 5 {
            assert_eq!(
                feed(Framing::Chunked(Chunked::default()), &input, step),
                Ok(body.len()),
                "step {step}"
            );
        }
    }

    #[test]
    fn trailers_are_skipped() {
        let body = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET");
        for step in [1, 2, 7, 64] {
            assert_eq!(
                feed(Framing::Chunked(Chunked::default()), &input, step),
                Ok(body.len())
            );
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"3\r\nabcX\r\n",
            b"3\nabc\r\n",
            b"12345678901234567\r\n",
        ] {
            assert_eq!(
                feed(Framing::Chunked(Chunked::default()), bad, 1),
                Err(Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_line = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            feed(
                Framing::Chunked(Chunked::default()),
                long_line.as_bytes(),
                100
            ),
            Err(Malformed)
        );
    }
}
