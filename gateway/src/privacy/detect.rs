//! Detectors of personal data and secrets in text: a pattern finds candidates, a validator
//! keeps only real ones (Luhn for payment cards, ISO 13616 mod-97 for IBANs, the SSA's rules
//! for US social security numbers, mod-11 for NHS numbers, `std`'s parsers for IP
//! addresses). Where two detections overlap, the one of the kind listed first in
//! [`Entity::ALL`] wins (a secret before an e-mail, an IBAN before a card...).
//!
//! Person names come from a gazetteer (`names.rs`), after every other kind.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use regex::Regex;

/// A kind of personal data or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    Secret,
    Email,
    Iban,
    Card,
    Ssn,
    Nhs,
    Ip,
    Phone,
    Name,
}

impl Entity {
    /// Every kind, in the order that settles overlaps.
    pub const ALL: [Entity; 9] = [
        Entity::Secret,
        Entity::Email,
        Entity::Iban,
        Entity::Card,
        Entity::Ssn,
        Entity::Nhs,
        Entity::Ip,
        Entity::Phone,
        Entity::Name,
    ];

    /// The label of placeholders, errors and metrics (bounded, upper case ASCII).
    pub fn label(self) -> &'static str {
        match self {
            Entity::Secret => "SECRET",
            Entity::Email => "EMAIL",
            Entity::Iban => "IBAN",
            Entity::Card => "CARD",
            Entity::Ssn => "SSN",
            Entity::Nhs => "NHS",
            Entity::Ip => "IP",
            Entity::Phone => "PHONE",
            Entity::Name => "NAME",
        }
    }

    fn pattern(self) -> Option<&'static Regex> {
        static PATTERNS: LazyLock<Vec<Option<Regex>>> = LazyLock::new(|| {
            Entity::ALL
                .iter()
                .map(|e| {
                    (*e != Entity::Name)
                        .then(|| Regex::new(e.source()).ok())
                        .flatten()
                })
                .collect()
        });
        PATTERNS.get(self as usize).and_then(Option::as_ref)
    }

    fn source(self) -> &'static str {
        match self {
            Entity::Secret => concat!(
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]{0,8192}?-----END [A-Z ]*PRIVATE KEY-----",
                r"|\bsk-ant-[A-Za-z0-9_\-]{20,}",
                r"|\bsk-(?:proj-)?[A-Za-z0-9_\-]{20,}",
                r"|\bAKIA[0-9A-Z]{16}\b",
                r"|\bgh[pousr]_[A-Za-z0-9]{36,}",
                r"|\bgithub_pat_[A-Za-z0-9_]{40,}",
                r"|\bxox[bpas]-[A-Za-z0-9\-]{10,}",
                r"|\bAIza[0-9A-Za-z_\-]{35}",
            ),
            Entity::Email => {
                r"\b[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b"
            }
            Entity::Iban => r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            Entity::Card => r"\b[0-9](?:[ \-]?[0-9]){12,18}\b",
            Entity::Ssn => r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
            Entity::Nhs => r"\b[0-9]{3}[ \-]?[0-9]{3}[ \-]?[0-9]{4}\b",
            Entity::Ip => concat!(
                r"\b[0-9]{1,3}(?:\.[0-9]{1,3}){3}\b",
                r"|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b",
                r"|\b(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?(?:\b|::)",
            ),
            Entity::Name => "",
            Entity::Phone => concat!(
                // International: `+` or `00`, then groups, an optional `(0)` or area code
                // in parentheses, and an extension.
                r"(?:\+|\b00)[1-9][0-9]{0,3}(?:[ .\-]?(?:\(0\)|\([0-9]{1,5}\)|[0-9]{1,5})){1,7}",
                r"(?:\s?(?:x|ext\.?)\s?[0-9]{1,6})?\b",
                // An area code in parentheses.
                r"|\([0-9]{2,5}\)[ \-]?[0-9]{2,8}(?:[ .\-][0-9]{2,8}){0,3}(?:\s?(?:x|ext\.?)\s?[0-9]{1,6})?\b",
                // Digit groups (checked in `valid_phone`), or one run of digits.
                r"|\b[0-9]{2,5}(?:[ .\-][0-9]{2,8}){1,4}(?:\s?(?:x|ext\.?)\s?[0-9]{1,6})?\b",
                r"|\b[0-9]{9,12}\b",
            ),
        }
    }

    /// Whether a candidate the pattern found at `start..end` of `text` is one.
    fn valid(self, text: &str, start: usize, end: usize) -> bool {
        let s = &text[start..end];
        match self {
            Entity::Secret => true,
            Entity::Email => valid_email(s),
            Entity::Iban => valid_iban(s),
            Entity::Card => valid_card(s),
            Entity::Ssn => valid_ssn(s),
            Entity::Nhs => valid_nhs(s) && cued(text, start, NHS_CUES),
            Entity::Ip => valid_ip(s),
            Entity::Phone => valid_phone(text, start, end),
            Entity::Name => true,
        }
    }
}

/// One detection: where it is and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub start: usize,
    pub end: usize,
    pub entity: Entity,
}

/// Every entity in `text` (person names only with `names`), sorted by position, without
/// overlaps.
pub fn detect(text: &str, names: bool) -> Vec<Found> {
    let mut found: Vec<Found> = Vec::new();
    let mut keep = |start: usize, end: usize, entity: Entity| {
        if !found.iter().any(|f| f.start < end && start < f.end) {
            found.push(Found { start, end, entity });
        }
    };
    for entity in Entity::ALL {
        if entity == Entity::Name {
            if names {
                for (start, end) in super::names::find(text) {
                    keep(start, end, entity);
                }
            }
            continue;
        }
        let Some(pattern) = entity.pattern() else {
            continue;
        };
        for m in pattern.find_iter(text) {
            if entity.valid(text, m.start(), m.end()) {
                keep(m.start(), m.end(), entity);
            }
        }
    }
    found.sort_by_key(|f| f.start);
    found
}

fn digits(s: &str) -> Vec<u8> {
    s.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && !local.ends_with('.')
        && !local.contains("..")
        && domain.contains('.')
}

/// The Luhn check over all digits of `s`.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut d = u32::from(*d);
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

fn valid_card(s: &str) -> bool {
    let d = digits(s);
    // 13 to 19 digits, a known scheme's first digit (2-6: Mastercard, Visa, Amex, Discover,
    // JCB, UnionPay...; JCB's 15-digit `1800`), not one digit repeated, and the Luhn check.
    (13..=19).contains(&d.len())
        && ((2..=6).contains(&d[0]) || (d.len() == 15 && d.starts_with(&[1, 8, 0, 0])))
        && d.iter().any(|x| *x != d[0])
        && luhn(&d)
}

/// ISO 13616: the country code and check digits moved to the end, letters as 10..35, the
/// number mod 97 is 1.
fn valid_iban(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for b in tail.iter().chain(head) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// The SSA's rules: area not 000, 666 or 900-999; group not 00; serial not 0000.
fn valid_ssn(s: &str) -> bool {
    let d = digits(s);
    if d.len() != 9 {
        return false;
    }
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = u32::from(d[3]) * 10 + u32::from(d[4]);
    let serial = d[5..].iter().fold(0u32, |n, x| n * 10 + u32::from(*x));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// NHS numbers: ten digits, the weighted sum (10..2) of the first nine mod 11 gives the
/// check digit (11 - r, 11 meaning 0; 10 is never issued).
fn valid_nhs(s: &str) -> bool {
    let d = digits(s);
    if d.len() != 10 || d.iter().all(|x| *x == d[0]) {
        return false;
    }
    let sum: u32 = d[..9]
        .iter()
        .enumerate()
        .map(|(i, x)| u32::from(*x) * (10 - i as u32))
        .sum();
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return false,
        c => c,
    };
    check == u32::from(d[9])
}

fn valid_ip(s: &str) -> bool {
    if s.contains('.') {
        return s.parse::<Ipv4Addr>().is_ok();
    }
    s.parse::<Ipv6Addr>().is_ok()
}

/// Words that announce a phone number (lower case; matched as prefixes of the text's words).
const PHONE_CUES: &[&str] = &[
    "tel",
    "tél",
    "phone",
    "call",
    "mobile",
    "cell",
    "fax",
    "reach",
    "whatsapp",
    "sms",
    "handy",
    "rückruf",
    "anruf",
    "erreichbar",
    "appel",
    "rappel",
    "portable",
    "llam",
    "teléfono",
    "telefono",
    "móvil",
    "movil",
    "chiam",
    "cellulare",
    "bel",
    "telefoon",
    "mobiel",
];

/// Words that announce an NHS number.
const NHS_CUES: &[&str] = &["nhs"];

/// How far before a value its cue may be (bytes).
const CUE_WINDOW: usize = 64;

/// Whether a word of the `CUE_WINDOW` bytes before `start` begins with one of `cues`.
fn cued(text: &str, start: usize, cues: &[&str]) -> bool {
    let mut from = start.saturating_sub(CUE_WINDOW);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..start]
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .any(|w| cues.iter().any(|c| w.starts_with(c)))
}

/// A phone number: 8 to 15 digits (E.164's maximum; an extension not counted). Written with
/// `+` or `00`, or an area code in parentheses, it is one. Otherwise its shape must be a
/// national one — a trunk `0` (then an area code) and 9 to 12 digits, or the North American `NXX-NXX-XXXX` with
/// dashes or dots — or a word such as "phone", "call", "Tel." must come shortly before it
/// (a bare run of digits, or groups like an NHS number's `943 476 5919`, say nothing alone).
fn valid_phone(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    let number = s.split(['x', 'e']).next().unwrap_or(s).trim_end();
    let d = digits(number);
    let n = d.len();
    let international = s.starts_with('+') || (s.starts_with("00") && n > 2 && d[2] != 0);
    if international {
        return (8..=15).contains(&n);
    }
    if !(9..=15).contains(&n) {
        return false;
    }
    if s.starts_with('(') {
        return true;
    }
    let groups: Vec<&str> = number.split([' ', '.', '-']).collect();
    let nanp = groups.len() == 3
        && !number.contains(' ')
        && [3, 3, 4] == [groups[0].len(), groups[1].len(), groups[2].len()]
        && d[0] >= 2
        && d[3] >= 2;
    let trunk = groups.len() > 1 && d[0] == 0 && d[1] != 0 && n <= 12 && !nhs_shaped(&groups);
    nanp || trunk || cued(text, start, PHONE_CUES)
}

/// `NNN NNN NNNN`: how NHS numbers are written.
fn nhs_shaped(groups: &[&str]) -> bool {
    groups.len() == 3 && [3, 3, 4] == [groups[0].len(), groups[1].len(), groups[2].len()]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn kinds(text: &str) -> Vec<(Entity, String)> {
        detect(text, true)
            .into_iter()
            .map(|f| (f.entity, text[f.start..f.end].to_string()))
            .collect()
    }

    fn one(text: &str, entity: Entity, value: &str) {
        assert_eq!(kinds(text), vec![(entity, value.to_string())], "{text}");
    }

    fn none(text: &str) {
        assert_eq!(kinds(text), vec![], "{text}");
    }

    #[test]
    fn every_pattern_compiles() {
        for e in Entity::ALL {
            assert!(Regex::new(e.source()).is_ok(), "{e:?}");
        }
    }

    #[test]
    fn cards_pass_luhn() {
        one(
            "card 4111 1111 1111 1111 ok",
            Entity::Card,
            "4111 1111 1111 1111",
        );
        one(
            "card 5555-5555-5555-4444.",
            Entity::Card,
            "5555-5555-5555-4444",
        );
        one("amex 378282246310005", Entity::Card, "378282246310005");
        // One digit off: Luhn fails, and it is not anything else either.
        none("card 4111 1111 1111 1112 ok");
        none("order 4111111111111112");
        none("0000 0000 0000 0000");
    }

    #[test]
    fn ibans_pass_mod_97() {
        one(
            "pay GB82 WEST 1234 5698 7654 32 now",
            Entity::Iban,
            "GB82 WEST 1234 5698 7654 32",
        );
        one(
            "DE89370400440532013000",
            Entity::Iban,
            "DE89370400440532013000",
        );
        none("GB83 WEST 1234 5698 7654 32");
        none("DE88370400440532013000");
    }

    #[test]
    fn ssns_follow_the_ssa_rules() {
        one("ssn 123-45-6789.", Entity::Ssn, "123-45-6789");
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "123-00-4567",
            "123-45-0000",
        ] {
            none(bad);
        }
    }

    #[test]
    fn nhs_numbers_pass_mod_11() {
        one("NHS 943 476 5919", Entity::Nhs, "943 476 5919");
        one("NHS 9434765919", Entity::Nhs, "9434765919");
        // One digit off: not an NHS number (it still looks like a US phone number).
        assert!(kinds("NHS 943 476 5918")
            .iter()
            .all(|(e, _)| *e != Entity::Nhs));
        none("NHS 9434765918");
        // A weighted sum whose check would be 10 is never issued.
        assert!(!valid_nhs("1000000010"));
        assert!(valid_nhs("1000000060"));
    }

    #[test]
    fn ip_addresses_are_parsed() {
        one("from 192.168.1.20 today", Entity::Ip, "192.168.1.20");
        one(
            "host 2001:db8:85a3::8a2e:370:7334 up",
            Entity::Ip,
            "2001:db8:85a3::8a2e:370:7334",
        );
        one(
            "host 2001:0db8:0000:0000:0000:ff00:0042:8329",
            Entity::Ip,
            "2001:0db8:0000:0000:0000:ff00:0042:8329",
        );
        none("version 300.1.2.999");
        none("at 10:30:00");
    }

    #[test]
    fn e_mails_are_found() {
        one(
            "write to jane.doe+x@example.co.uk.",
            Entity::Email,
            "jane.doe+x@example.co.uk",
        );
        none("a @ sign and user@localhost");
        none("x..y@example.com is malformed");
    }

    #[test]
    fn phones_in_e164_and_national_formats() {
        one(
            "call +44 20 7946 0958 now",
            Entity::Phone,
            "+44 20 7946 0958",
        );
        one("call +14155552671", Entity::Phone, "+14155552671");
        one("call (415) 555-2671", Entity::Phone, "(415) 555-2671");
        one("call 020 7946 0958", Entity::Phone, "020 7946 0958");
        none("call +12 3");
        none("in 2024-01-15 we met");
    }

    #[test]
    fn secrets_by_prefix() {
        let ant = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345";
        one(&format!("key {ant} end"), Entity::Secret, ant);
        one(
            "key sk-proj-abcdefghij1234567890XYZ",
            Entity::Secret,
            "sk-proj-abcdefghij1234567890XYZ",
        );
        one(
            "aws AKIAIOSFODNN7EXAMPLE",
            Entity::Secret,
            "AKIAIOSFODNN7EXAMPLE",
        );
        let gh = format!("ghp_{}", "a1".repeat(18));
        one(&format!("token {gh}"), Entity::Secret, &gh);
        one(
            "slack xoxb-1234-5678-abcdefgh",
            Entity::Secret,
            "xoxb-1234-5678-abcdefgh",
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----";
        one(&format!("here:\n{pem}\nthanks"), Entity::Secret, pem);
        none("a task-list of sk-short");
    }

    #[test]
    fn ordinary_text_has_nothing() {
        none("The meeting is at 10:30 on 2024-01-15 in room 12; budget 1,250,000 EUR.");
        none("no digits here at all");
        none("");
    }
}
