//! The ledger's format, independent of the database: canonical JSON bodies, the hash chain, and
//! verification of a sequence of entries (from the server, the database, or an exported file).
//!
//! An entry is `(seq, body, prev_hash, hash)` with
//! `hash = BLAKE3("accrete.ledger.v1\n" || u64_be(seq) || u64_be(len(body)) || body || prev_hash)`,
//! `seq` counting from 1 and the first `prev_hash` being 32 zero bytes. The body is canonical
//! JSON (see [`canonical_json`]); verification hashes the body's bytes exactly as stored, so a
//! verifier never has to re-encode anything.

use serde_json::Value;

/// Domain separation: a ledger hash can never be confused with an output or module hash.
pub const DOMAIN: &[u8] = b"accrete.ledger.v1\n";
pub const GENESIS: [u8; 32] = [0; 32];

/// One chained entry as it is stored and exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub body: String,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// The hash of an entry with this sequence number, body and predecessor.
pub fn entry_hash(seq: u64, body: &[u8], prev: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(&seq.to_be_bytes());
    h.update(&(body.len() as u64).to_be_bytes());
    h.update(body);
    h.update(prev);
    *h.finalize().as_bytes()
}

/// Canonical JSON: UTF-8, no whitespace, object keys sorted by their UTF-8 bytes, strings
/// escaped as serde_json does (`"` `\\` and control characters only), numbers as serde_json
/// prints them (integers as integers, floats in shortest round-trip form).
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Appends entries to a chain in memory: what the sealer uses to hash a batch.
#[derive(Debug, Clone)]
pub struct Chain {
    pub len: u64,
    pub head: [u8; 32],
}

impl Chain {
    pub fn new(len: u64, head: [u8; 32]) -> Chain {
        Chain { len, head }
    }

    pub fn append(&mut self, body: String) -> Entry {
        let seq = self.len + 1;
        let hash = entry_hash(seq, body.as_bytes(), &self.head);
        let entry = Entry {
            seq,
            body,
            prev_hash: self.head,
            hash,
        };
        self.len = seq;
        self.head = hash;
        entry
    }
}

/// Why an entry does not belong to an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// Entries are missing or out of order: `seq` where `expected` should be.
    Gap { expected: u64, seq: u64 },
    /// The entry names a predecessor other than the entry before it.
    PrevMismatch { seq: u64 },
    /// The stored hash is not the hash of the entry's content.
    HashMismatch { seq: u64 },
}

impl Broken {
    pub fn seq(&self) -> u64 {
        match self {
            Broken::Gap { seq, .. }
            | Broken::PrevMismatch { seq }
            | Broken::HashMismatch { seq } => *seq,
        }
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Gap { expected, seq } => {
                write!(f, "entry {seq} found where entry {expected} should be")
            }
            Broken::PrevMismatch { seq } => write!(
                f,
                "entry {seq}: prev_hash is not the hash of the entry before it"
            ),
            Broken::HashMismatch { seq } => write!(
                f,
                "entry {seq}: its content does not hash to its stored hash (altered)"
            ),
        }
    }
}

/// Checks entries one by one, in order; stops at the first broken one.
#[derive(Debug, Clone)]
pub struct Verifier {
    chain: Chain,
    broken: Option<Broken>,
}

impl Default for Verifier {
    fn default() -> Verifier {
        Verifier::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier {
            chain: Chain::new(0, GENESIS),
            broken: None,
        }
    }

    /// Checks the next entry. Returns false once the chain is broken (later entries are ignored).
    pub fn push(&mut self, e: &Entry) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let expected = self.chain.len + 1;
        let broken = if e.seq != expected {
            Some(Broken::Gap {
                expected,
                seq: e.seq,
            })
        } else if e.prev_hash != self.chain.head {
            Some(Broken::PrevMismatch { seq: e.seq })
        } else if entry_hash(e.seq, e.body.as_bytes(), &e.prev_hash) != e.hash {
            Some(Broken::HashMismatch { seq: e.seq })
        } else {
            None
        };
        match broken {
            Some(b) => {
                self.broken = Some(b);
                false
            }
            None => {
                self.chain.len = e.seq;
                self.chain.head = e.hash;
                true
            }
        }
    }

    pub fn finish(self) -> Verdict {
        match self.broken {
            Some(b) => Verdict::Broken {
                intact_len: self.chain.len,
                broken: b,
            },
            None => Verdict::Intact {
                len: self.chain.len,
                head: self.chain.head,
            },
        }
    }
}

/// The outcome of verifying a whole ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact { len: u64, head: [u8; 32] },
    Broken { intact_len: u64, broken: Broken },
}

/// Verifies a sequence of entries in one go.
pub fn verify<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Verdict {
    let mut v = Verifier::new();
    for e in entries {
        if !v.push(e) {
            break;
        }
    }
    v.finish()
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One line of `accrete ledger export`:
/// `{"body":"<the body, as a JSON string>","hash":"<hex>","prev_hash":"<hex>","seq":N}`.
pub fn to_json_line(e: &Entry) -> String {
    canonical_json(&serde_json::json!({
        "seq": e.seq,
        "body": e.body,
        "prev_hash": hex(&e.prev_hash),
        "hash": hex(&e.hash),
    }))
}

pub fn from_json_line(line: &str) -> Result<Entry, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let field = |k: &str| v.get(k).ok_or_else(|| format!("missing field {k:?}"));
    let hash32 = |k: &str| -> Result<[u8; 32], String> {
        field(k)?
            .as_str()
            .and_then(unhex32)
            .ok_or_else(|| format!("{k} is not 64 hex digits"))
    };
    Ok(Entry {
        seq: field("seq")?.as_u64().ok_or("seq is not a number")?,
        body: field("body")?
            .as_str()
            .ok_or("body is not a string")?
            .to_string(),
        prev_hash: hash32("prev_hash")?,
        hash: hash32("hash")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<Entry> {
        let mut c = Chain::new(0, GENESIS);
        (0..n)
            .map(|i| c.append(canonical_json(&serde_json::json!({ "i": i }))))
            .collect()
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v: Value =
            serde_json::from_str(r#"{ "b": [1, {"z": 0.5, "a": "x\"y"}], "a": null }"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":null,"b":[1,{"a":"x\"y","z":0.5}]}"#
        );
    }

    #[test]
    fn intact_chain_verifies_with_its_head() {
        let entries = chain(5);
        assert_eq!(
            verify(&entries),
            Verdict::Intact {
                len: 5,
                head: entries[4].hash
            }
        );
        assert_eq!(
            verify(&[]),
            Verdict::Intact {
                len: 0,
                head: GENESIS
            }
        );
    }

    #[test]
    fn verify_names_the_first_altered_entry() {
        let mut entries = chain(5);
        entries[2].body = entries[2].body.replace('2', "7");
        assert_eq!(
            verify(&entries),
            Verdict::Broken {
                intact_len: 2,
                broken: Broken::HashMismatch { seq: 3 }
            }
        );
        // Re-hashing the altered entry does not help: the next one no longer links to it.
        entries[2].hash = entry_hash(3, entries[2].body.as_bytes(), &entries[2].prev_hash);
        assert_eq!(verify(&entries).clone(), {
            Verdict::Broken {
                intact_len: 3,
                broken: Broken::PrevMismatch { seq: 4 },
            }
        });
        let mut gap = chain(5);
        gap.remove(1);
        assert!(matches!(
            verify(&gap),
            Verdict::Broken {
                broken: Broken::Gap {
                    expected: 2,
                    seq: 3
                },
                ..
            }
        ));
    }

    #[test]
    fn json_lines_round_trip() {
        for e in chain(3) {
            assert_eq!(from_json_line(&to_json_line(&e)).unwrap(), e);
        }
        assert!(from_json_line(r#"{"seq":1}"#).is_err());
    }
}
