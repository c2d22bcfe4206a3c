//! Person names, found with a gazetteer: the first and last names the `fake` crate ships for
//! its locales (English, French, German, Italian, Dutch, Portuguese, Welsh; about 5,000 first
//! and 2,000 last names).
//!
//! A name is a run of capitalized words that either starts with a known first name followed
//! by another capitalized word (`Anna Schmidt`, `Jose Carlos Quintero`), or follows a title
//! (`Dr. Okafor`, `Frau Weber`, `Mme Lefèvre`). First names that are also common words
//! (`May`, `Will`, `Grant`...) count only when a known last name follows. What a gazetteer
//! cannot know stays unseen: names from other cultures, a first name alone, a last name
//! alone, lower-case names. `tests/pii/` measures what it reaches.

use std::collections::HashSet;
use std::sync::LazyLock;

use fake::locales::{Data, CY_GB, DE_DE, EN, FR_FR, IT_IT, NL_NL, PT_BR, PT_PT};

struct Gazetteer {
    first: HashSet<&'static str>,
    last: HashSet<&'static str>,
}

static GAZETTEER: LazyLock<Gazetteer> = LazyLock::new(|| {
    let mut first = HashSet::new();
    let mut last = HashSet::new();
    for (f, l) in [
        (EN::NAME_FIRST_NAME, EN::NAME_LAST_NAME),
        (FR_FR::NAME_FIRST_NAME, FR_FR::NAME_LAST_NAME),
        (DE_DE::NAME_FIRST_NAME, DE_DE::NAME_LAST_NAME),
        (IT_IT::NAME_FIRST_NAME, IT_IT::NAME_LAST_NAME),
        (NL_NL::NAME_FIRST_NAME, NL_NL::NAME_LAST_NAME),
        (PT_BR::NAME_FIRST_NAME, PT_BR::NAME_LAST_NAME),
        (PT_PT::NAME_FIRST_NAME, PT_PT::NAME_LAST_NAME),
        (CY_GB::NAME_FIRST_NAME, CY_GB::NAME_LAST_NAME),
    ] {
        first.extend(f.iter().copied().filter(|n| !AMBIGUOUS.contains(n)));
        last.extend(l.iter().copied());
    }
    Gazetteer { first, last }
});

/// First names in the lists that are also common words: a name only before a last name.
const AMBIGUOUS: &[&str] = &[
    "America", "Amber", "April", "Art", "August", "Autumn", "Baby", "Bill", "Brain", "Brown",
    "Chase", "Christ", "Crystal", "Dawn", "Dean", "Destiny", "Diamond", "Earl", "Easter", "Faith",
    "Florida", "Ford", "Forest", "Frank", "General", "Genesis", "Golden", "Grant", "Green", "Guy",
    "Harmony", "Heaven", "Hope", "Ivory", "Jade", "Joy", "June", "Major", "Mark", "May", "Miracle",
    "Missouri", "Montana", "Name", "Noble", "Paris", "Pat", "Pearl", "Precious", "Price", "Prince",
    "Princess", "Queen", "River", "Rose", "Royal", "Ruby", "Sister", "Stone", "Summer", "Sunny",
    "Trinity", "Unique", "Will",
];

/// Titles before a name, in the languages of the gazetteer (without their full stop).
const TITLES: &[&str] = &[
    "Mr", "Mrs", "Ms", "Miss", "Dr", "Prof", "Herr", "Frau", "Mme", "Mlle", "Monsieur", "Madame",
    "Sr", "Sra", "Srta", "Señor", "Señora", "Sig", "Signor", "Signora", "Dott", "Dhr", "Mevr",
];

/// Lower-case words inside a name (`Ludwig van Beethoven`).
const PARTICLES: &[&str] = &[
    "van", "von", "de", "der", "den", "da", "di", "del", "della", "du", "la", "le", "ter", "zu",
    "dos", "das",
];

/// Capitalized words that end a name rather than continue it (places, weekdays, months).
const NOT_NAMES: &[&str] = &[
    "Street",
    "Road",
    "Avenue",
    "Park",
    "Square",
    "Bridge",
    "Center",
    "Centre",
    "University",
    "College",
    "School",
    "Hospital",
    "Inc",
    "Ltd",
    "Corp",
    "Group",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "The",
    "And",
    "Or",
    "But",
    "I",
];

/// One word of the text: its bytes and whether it is followed by exactly one space.
#[derive(Clone, Copy)]
struct Word<'a> {
    text: &'a str,
    start: usize,
    end: usize,
    /// The word is followed by `. ` (a title's abbreviation).
    dot_space: bool,
    /// The word is followed by exactly one space, then the next word.
    space: bool,
}

fn words(text: &str) -> Vec<Word<'_>> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !c.is_alphabetic() {
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            let inner = (d == '-' || d == '\'' || d == '’')
                && text[j + d.len_utf8()..]
                    .chars()
                    .next()
                    .is_some_and(char::is_alphabetic);
            if d.is_alphabetic() || inner {
                end = j + d.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let rest = &text[end..];
        out.push(Word {
            text: &text[i..end],
            start: i,
            end,
            dot_space: rest.starts_with(". "),
            space: rest.starts_with(' ') && !rest[1..].starts_with(' '),
        });
    }
    // A word is joined to the next only if nothing but that one space lies between them.
    for k in 0..out.len().saturating_sub(1) {
        let next = out[k + 1].start;
        if out[k].space && next != out[k].end + 1 {
            out[k].space = false;
        }
        if out[k].dot_space && next != out[k].end + 2 {
            out[k].dot_space = false;
        }
    }
    out
}

/// Upper-case first letter, and a lower-case letter after it (not an acronym).
fn capitalized(w: &str) -> bool {
    let mut cs = w.chars();
    cs.next().is_some_and(char::is_uppercase) && cs.any(char::is_lowercase)
}

/// The word without a possessive `'s`.
fn base(w: &str) -> &str {
    w.strip_suffix("'s")
        .or_else(|| w.strip_suffix("’s"))
        .unwrap_or(w)
}

fn name_part(w: &str) -> bool {
    capitalized(w) && !NOT_NAMES.contains(&w)
}

/// A known first name, hyphenated ones included (`Hans-Peter`).
fn known_first(g: &Gazetteer, w: &str) -> bool {
    g.first.contains(w) || (w.contains('-') && w.split('-').all(|p| g.first.contains(p)))
}

/// The byte ranges of the person names in `text`.
pub fn find(text: &str) -> Vec<(usize, usize)> {
    let g = &*GAZETTEER;
    let ws = words(text);
    let mut found = Vec::new();
    let mut i = 0;
    while i < ws.len() {
        let w = ws[i];
        let particle = i + 2 < ws.len()
            && PARTICLES.contains(&ws[i + 1].text)
            && ws[i + 1].space
            && name_part(base(ws[i + 2].text));
        let joined = particle || (i + 1 < ws.len() && name_part(base(ws[i + 1].text)));
        let titled = TITLES.contains(&w.text) && (w.space || w.dot_space) && joined;
        // A first name, then a capitalized word; or any capitalized word, then a last name.
        let named = capitalized(w.text) && w.space && joined && {
            let next = base(ws[i + 1].text);
            known_first(g, w.text)
                || (g.last.contains(next) && !known_first(g, next) && !NOT_NAMES.contains(&w.text))
        };
        let start = if titled {
            i + 1
        } else if named {
            i
        } else {
            i += 1;
            continue;
        };
        // Extend over further name words: after a title any capitalized word (up to three
        // in all); else known names, or a particle and a capitalized word.
        let mut e = if particle && !titled {
            i + 2
        } else {
            start + usize::from(!titled)
        };
        while e + 1 < ws.len() && ws[e].space && ws[e].text == base(ws[e].text) {
            let next = ws[e + 1].text;
            let known = g.last.contains(base(next)) || known_first(g, next);
            if name_part(base(next)) && (known || (titled && e < start + 2)) {
                e += 1;
            } else if PARTICLES.contains(&next)
                && ws[e + 1].space
                && e + 2 < ws.len()
                && name_part(base(ws[e + 2].text))
            {
                e += 2;
            } else {
                break;
            }
        }
        let end = ws[e].start + base(ws[e].text).len();
        found.push((ws[start].start, end));
        i = e + 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<&str> {
        find(text).into_iter().map(|(s, e)| &text[s..e]).collect()
    }

    #[test]
    fn first_and_last_names() {
        assert_eq!(names("Hi, I am Anna Schmidt."), ["Anna Schmidt"]);
        assert_eq!(names("Ask Anna Maria Schmidt."), ["Anna Maria Schmidt"]);
        assert_eq!(
            names("Ludwig van Beethoven wrote it"),
            ["Ludwig van Beethoven"]
        );
        assert_eq!(names("Sarah Okafor's order"), ["Sarah Okafor"]);
    }

    #[test]
    fn titles_introduce_names() {
        assert_eq!(names("Dr. Okafor will call"), ["Okafor"]);
        assert_eq!(names("Frau Weber hat"), ["Weber"]);
        assert_eq!(names("Mme Lefèvre a écrit"), ["Lefèvre"]);
    }

    #[test]
    fn common_words_and_places_are_not_names() {
        assert!(names("Will Access be granted?").is_empty());
        assert!(names("May Day parade").is_empty());
        assert!(names("The NHS and IBAN rules").is_empty());
        assert!(names("Anna Street is closed").is_empty());
        assert!(names("anna schmidt").is_empty());
        assert_eq!(names("Will Smith arrived"), ["Will Smith"]);
    }
}
