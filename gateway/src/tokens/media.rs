//! Images and documents in a prompt: their dimensions (or page count) read from the bytes of a
//! data URL, and the providers' published formulas that turn those into tokens.
//!
//! Only headers are parsed, by hand, bounded and without panics: PNG's `IHDR`, GIF's logical
//! screen, WebP's `VP8 `/`VP8L`/`VP8X` chunk and JPEG's first start-of-frame segment. Anything
//! else (a remote URL, a truncated or unknown file) gets a documented default.

use base64::Engine;

/// How much of a data URL's base64 is decoded to find an image header. PNG, GIF and WebP put
/// their size in the first 30 bytes; a JPEG's start-of-frame can follow a large EXIF block.
const HEADER_PREFIX_BASE64: &[usize] = &[64 * 1024, 1024 * 1024];

/// Tokens per PDF page when the page count is known: Anthropic documents 1,500–3,000 text
/// tokens per page plus the page's image; its token-counting example reports 2,188 tokens for
/// a short document. OpenAI sends both the extracted text and a page image too.
pub(super) const PDF_PAGE_TOKENS: u64 = 2_000;

/// Dimensions assumed for an image whose bytes the gateway cannot see (a remote URL) or
/// cannot read: a 1024×1024 image, 765 tokens at high detail on GPT-4o.
const DEFAULT_DIMS: (u32, u32) = (1024, 1024);

/// Anthropic's cost of an image of unknown size: the largest an image gets after Claude's own
/// resize (about 1.15 megapixels, "~1,600 tokens").
const ANTHROPIC_DEFAULT_IMAGE_TOKENS: u64 = 1_600;

/// OpenAI's `detail` setting of an image part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageDetail {
    Low,
    /// `"high"`; `"auto"` and an absent detail are counted as high, the larger of the two.
    High,
}

impl ImageDetail {
    pub fn parse(detail: Option<&str>) -> ImageDetail {
        match detail {
            Some(d) if d.eq_ignore_ascii_case("low") => ImageDetail::Low,
            _ => ImageDetail::High,
        }
    }
}

/// How a model family turns an image into tokens.
enum OpenAiImageRule {
    /// 512-px tiles: `base` for the image plus `tile` per tile (low detail: `base` alone).
    Tiles { base: u64, tile: u64 },
    /// 32-px patches, at most 1,536, times a per-model multiplier; detail does not apply.
    Patches { multiplier: f64 },
}

fn openai_image_rule(model: &str) -> OpenAiImageRule {
    let m = super::bare(model);
    let patches = |multiplier| OpenAiImageRule::Patches { multiplier };
    let tiles = |base, tile| OpenAiImageRule::Tiles { base, tile };
    if m.starts_with("gpt-4.1-mini") || m.starts_with("gpt-5-mini") {
        patches(1.62)
    } else if m.starts_with("gpt-4.1-nano") || m.starts_with("gpt-5-nano") {
        patches(2.46)
    } else if m.starts_with("o4-mini") {
        patches(1.72)
    } else if m.starts_with("gpt-4o-mini") {
        tiles(2833, 5667)
    } else if m.starts_with("gpt-5") {
        tiles(70, 140)
    } else if m.starts_with("o1") || m.starts_with("o3") {
        tiles(75, 150)
    } else if m.starts_with("computer-use") {
        tiles(65, 129)
    } else {
        // GPT-4o, GPT-4.1, GPT-4.5, GPT-4 Turbo and, as an approximation, everything else.
        tiles(85, 170)
    }
}

/// OpenAI's published image cost for `model`, given the image's size (`None` when unknown:
/// 1024×1024 is assumed) and the requested detail.
pub fn openai_image_tokens(model: &str, dims: Option<(u32, u32)>, detail: ImageDetail) -> u64 {
    let (w, h) = dims.unwrap_or(DEFAULT_DIMS);
    match openai_image_rule(model) {
        OpenAiImageRule::Tiles { base, .. } if detail == ImageDetail::Low => base,
        OpenAiImageRule::Tiles { base, tile } => {
            let (w, h) = openai_tile_size(w, h);
            base + tile * u64::from(w.div_ceil(512)) * u64::from(h.div_ceil(512))
        }
        OpenAiImageRule::Patches { multiplier } => {
            (openai_patches(w, h) as f64 * multiplier).ceil() as u64
        }
    }
}

/// The size an image is tiled at: scaled down to fit 2048×2048, then down so that its shorter
/// side is at most 768 (never up: a 128×64 image is one tile).
fn openai_tile_size(w: u32, h: u32) -> (u32, u32) {
    let (mut w, mut h) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let fit = (2048.0 / w.max(h)).min(1.0);
    w *= fit;
    h *= fit;
    let short = (768.0 / w.min(h)).min(1.0);
    w *= short;
    h *= short;
    ((w.floor() as u32).max(1), (h.floor() as u32).max(1))
}

/// 32-px patches covering the image, after scaling it down to fit 1,536 patches.
fn openai_patches(w: u32, h: u32) -> u64 {
    const BUDGET: u64 = 1536;
    let raw = u64::from(w.div_ceil(32)) * u64::from(h.div_ceil(32));
    if raw <= BUDGET {
        return raw;
    }
    let (w, h) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let mut r = (32.0 * 32.0 * BUDGET as f64 / (w * h)).sqrt();
    let (pw, ph) = (w * r / 32.0, h * r / 32.0);
    // Scaled again so that the image fits a whole number of patches (unless a side is
    // thinner than one patch, where the published formula would scale to nothing).
    let whole = (pw.floor() / pw).min(ph.floor() / ph);
    if whole > 0.0 {
        r *= whole;
    }
    // 1e-6 absorbs float error: 1056 px must be 33 patches, not 34.
    let cover = |x: f64| (((x * r / 32.0) - 1e-6).ceil() as u64).max(1);
    (cover(w) * cover(h)).min(BUDGET)
}

/// Anthropic's published image cost: `width × height / 750` after Claude's resize (long edge
/// at most 1,568 px, and at most about 1,600 tokens); 1,600 when the size is unknown.
pub fn anthropic_image_tokens(dims: Option<(u32, u32)>) -> u64 {
    let Some((w, h)) = dims else {
        return ANTHROPIC_DEFAULT_IMAGE_TOKENS;
    };
    let (mut w, mut h) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let edge = (1568.0 / w.max(h)).min(1.0);
    w *= edge;
    h *= edge;
    let tokens = (w * h / 750.0).ceil();
    (tokens.min(ANTHROPIC_DEFAULT_IMAGE_TOKENS as f64) as u64).max(1)
}

/// The bytes of a `data:...;base64,` URL's payload, or `None` for any other URL.
fn data_url_payload(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("data:")?;
    let (meta, payload) = rest.split_once(',')?;
    meta.ends_with(";base64").then_some(payload)
}

/// Decodes the first `limit` characters of `b64` (cut to a multiple of four).
fn decode_prefix(b64: &str, limit: usize) -> Option<Vec<u8>> {
    let n = b64.len().min(limit) / 4 * 4;
    let prefix = b64.get(..n)?;
    base64::engine::general_purpose::STANDARD
        .decode(prefix)
        .ok()
}

/// Width and height of the image in a base64 string, if its header is one this module reads.
pub(super) fn image_dims_base64(b64: &str) -> Option<(u32, u32)> {
    for &limit in HEADER_PREFIX_BASE64 {
        let bytes = decode_prefix(b64, limit)?;
        if let Some(dims) = image_dims(&bytes) {
            return Some(dims);
        }
        if bytes.len() < limit / 4 * 3 {
            // The whole image was decoded: a longer prefix would not help.
            return None;
        }
    }
    None
}

/// Width and height of the image in a data URL (`None` for remote URLs and unread headers).
pub(super) fn image_dims_url(url: &str) -> Option<(u32, u32)> {
    image_dims_base64(data_url_payload(url)?)
}

/// Width and height from an image file's first bytes (PNG, GIF, WebP or JPEG).
pub(super) fn image_dims(b: &[u8]) -> Option<(u32, u32)> {
    let dims = if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        png_dims(b)
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some((u32::from(le16(b, 6)?), u32::from(le16(b, 8)?)))
    } else if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        webp_dims(b)
    } else if b.starts_with(&[0xFF, 0xD8]) {
        jpeg_dims(b)
    } else {
        None
    }?;
    (dims.0 > 0 && dims.1 > 0).then_some(dims)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
}

fn png_dims(b: &[u8]) -> Option<(u32, u32)> {
    // Signature (8), then the IHDR chunk: length (4), type (4), width (4), height (4).
    (b.get(12..16)? == b"IHDR").then_some(())?;
    Some((be32(b, 16)?, be32(b, 20)?))
}

fn webp_dims(b: &[u8]) -> Option<(u32, u32)> {
    match b.get(12..16)? {
        b"VP8 " => {
            // Frame tag (3 bytes) and start code 9d 01 2a, then 14-bit width and height.
            (b.get(23..26)? == [0x9d, 0x01, 0x2a]).then_some(())?;
            Some((
                u32::from(le16(b, 26)? & 0x3fff),
                u32::from(le16(b, 28)? & 0x3fff),
            ))
        }
        b"VP8L" => {
            (*b.get(20)? == 0x2f).then_some(())?;
            let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
            Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        b"VP8X" => Some((le24(b, 24)? + 1, le24(b, 27)? + 1)),
        _ => None,
    }
}

fn jpeg_dims(b: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2;
    loop {
        // Markers may be preceded by fill bytes (0xFF).
        while *b.get(i)? != 0xFF {
            i += 1;
        }
        while *b.get(i)? == 0xFF {
            i += 1;
        }
        let marker = *b.get(i)?;
        i += 1;
        match marker {
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            // End of image or start of scan before any frame header: no size to find.
            0xD9 | 0xDA => return None,
            // Start-of-frame markers (not DHT C4, JPG C8, DAC CC): length, precision, height, width.
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                return Some((u32::from(be16(b, i + 5)?), u32::from(be16(b, i + 3)?)));
            }
            _ => {
                let len = usize::from(be16(b, i)?);
                if len < 2 {
                    return None;
                }
                i += len;
            }
        }
    }
}

/// Pages in a base64 PDF (`None` when the structure is hidden, e.g. in compressed object
/// streams): the larger of the number of `/Type /Page` objects and the largest `/Count`.
pub(super) fn pdf_pages_base64(b64: &str) -> Option<u64> {
    // Decoded a chunk at a time (a multiple of four characters); the last `TAIL` bytes of a
    // chunk are scanned with the next one so that a marker cut in two is still seen, once.
    const CHUNK: usize = 64 * 1024;
    const TAIL: usize = 32;
    let b64 = b64.trim_end_matches('=');
    let mut pages = 0u64;
    let mut max_count = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < b64.len() {
        let end = (at + CHUNK).min(b64.len());
        let piece = b64.get(at..end)?;
        let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(piece)
            .ok()?;
        let mut bytes = std::mem::take(&mut carry);
        bytes.extend_from_slice(&decoded);
        let upto = if end == b64.len() {
            bytes.len()
        } else {
            bytes.len().saturating_sub(TAIL)
        };
        let (p, c) = scan_pdf(&bytes, upto);
        pages += p;
        max_count = max_count.max(c);
        carry = bytes.get(upto..).unwrap_or_default().to_vec();
        at = end;
    }
    let n = pages.max(max_count);
    (n > 0).then_some(n)
}

/// In `b`: `/Type /Page` objects whose `/Type` starts before `upto`, and the largest
/// `/Count n` whose number ends inside `b`.
fn scan_pdf(b: &[u8], upto: usize) -> (u64, u64) {
    let mut pages = 0;
    let mut max_count = 0;
    for at in memchr::memmem::find_iter(b, b"/Type") {
        if at >= upto {
            break;
        }
        let rest = skip_ws(b, at + 5);
        if b.get(rest..rest + 5) == Some(b"/Page")
            && !b.get(rest + 5).is_some_and(|c| c.is_ascii_alphanumeric())
        {
            pages += 1;
        }
    }
    for at in memchr::memmem::find_iter(b, b"/Count") {
        let mut i = skip_ws(b, at + 6);
        let mut n: u64 = 0;
        while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            n = n.saturating_mul(10).saturating_add(u64::from(d - b'0'));
            i += 1;
        }
        // A number cut by the end of the buffer is read again, whole, with the next chunk.
        if i < b.len() && n < 100_000 {
            max_count = max_count.max(n);
        }
    }
    (pages, max_count)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// Estimated tokens of a PDF given as base64: [`PDF_PAGE_TOKENS`] per page, one page when the
/// count cannot be read.
pub(super) fn pdf_tokens_base64(b64: &str) -> u64 {
    PDF_PAGE_TOKENS * pdf_pages_base64(b64).unwrap_or(1)
}

/// Estimated tokens of a PDF given as a data URL, or one page for anything else.
pub(super) fn pdf_tokens_url(url: &str) -> u64 {
    data_url_payload(url).map_or(PDF_PAGE_TOKENS, pdf_tokens_base64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header-only image of the given format and size (enough for [`image_dims`]).
    pub(crate) fn header(format: &str, w: u32, h: u32) -> Vec<u8> {
        let mut b = Vec::new();
        match format {
            "png" => {
                b.extend_from_slice(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR");
                b.extend_from_slice(&w.to_be_bytes());
                b.extend_from_slice(&h.to_be_bytes());
                b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
            }
            "gif" => {
                b.extend_from_slice(b"GIF89a");
                b.extend_from_slice(&(w as u16).to_le_bytes());
                b.extend_from_slice(&(h as u16).to_le_bytes());
                b.extend_from_slice(&[0, 0, 0]);
            }
            "webp" => {
                b.extend_from_slice(b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0");
                b.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
                b.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
            }
            "jpeg" => {
                // SOI, an APP0 segment, then SOF0.
                b.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 16]);
                b.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
                b.extend_from_slice(&[0xFF, 0xC0, 0, 17, 8]);
                b.extend_from_slice(&(h as u16).to_be_bytes());
                b.extend_from_slice(&(w as u16).to_be_bytes());
                b.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
            }
            other => panic!("no header for {other}"),
        }
        b
    }

    #[test]
    fn reads_dimensions_of_each_format() {
        for f in ["png", "gif", "webp", "jpeg"] {
            assert_eq!(image_dims(&header(f, 640, 480)), Some((640, 480)), "{f}");
        }
        // WebP lossy (VP8 ) and lossless (VP8L) headers.
        let mut vp8 = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\x10\x02\x00\x9d\x01\x2a".to_vec();
        vp8.extend_from_slice(&300u16.to_le_bytes());
        vp8.extend_from_slice(&200u16.to_le_bytes());
        assert_eq!(image_dims(&vp8), Some((300, 200)));
        let mut vp8l = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        let bits: u32 = 299 | (199 << 14);
        vp8l.extend_from_slice(&bits.to_le_bytes());
        assert_eq!(image_dims(&vp8l), Some((300, 200)));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_u32;
        for len in 0..300 {
            for prefix in [
                &b"\xFF\xD8"[..],
                b"\x89PNG\r\n\x1a\n",
                b"RIFF\0\0\0\0WEBPVP8 ",
                b"",
            ] {
                let mut b = prefix.to_vec();
                for _ in 0..len {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    b.push(seed as u8);
                }
                let _ = image_dims(&b);
                let _ = scan_pdf(&b, b.len());
            }
        }
        assert_eq!(image_dims(&[0xFF, 0xD8, 0xFF, 0xC0]), None);
        assert_eq!(image_dims_url("data:image/png;base64,!!!not base64"), None);
        assert_eq!(image_dims_url("https://example.com/a.png"), None);
        assert_eq!(image_dims_url("data:image/png,rawbytes"), None);
        assert_eq!(pdf_pages_base64("%%%"), None);
        assert_eq!(
            openai_image_tokens("gpt-4o", Some((0, 0)), ImageDetail::High),
            255
        );
        assert!(
            openai_image_tokens("gpt-4.1-mini", Some((u32::MAX, 1)), ImageDetail::High) <= 2489
        );
        assert!(anthropic_image_tokens(Some((u32::MAX, u32::MAX))) <= 1600);
    }

    #[test]
    fn openai_worked_examples() {
        // The vision guide's examples for GPT-4o.
        assert_eq!(
            openai_image_tokens("gpt-4o", Some((1024, 1024)), ImageDetail::High),
            765
        );
        assert_eq!(
            openai_image_tokens("gpt-4o", Some((2048, 4096)), ImageDetail::High),
            1105
        );
        assert_eq!(
            openai_image_tokens("gpt-4o", Some((4096, 8192)), ImageDetail::Low),
            85
        );
        // Patch models: 1024×1024 is 1,024 patches, 1800×2400 is 1,452 (before multipliers).
        assert_eq!(openai_patches(1024, 1024), 1024);
        assert_eq!(openai_patches(1800, 2400), 1452);
        assert_eq!(
            openai_image_tokens("gpt-4.1-mini", Some((1024, 1024)), ImageDetail::Low),
            1659
        );
        // Unknown size: 1024×1024 assumed.
        assert_eq!(openai_image_tokens("gpt-4o", None, ImageDetail::High), 765);
        assert_eq!(
            openai_image_tokens("gpt-4o-mini", None, ImageDetail::Low),
            2833
        );
    }

    #[test]
    fn anthropic_examples() {
        // The vision guide's table: 200×200 ≈ 54, 1000×1000 ≈ 1,334, 1092×1092 ≈ 1,590.
        assert_eq!(anthropic_image_tokens(Some((200, 200))), 54);
        assert_eq!(anthropic_image_tokens(Some((1000, 1000))), 1334);
        assert_eq!(anthropic_image_tokens(Some((1092, 1092))), 1590);
        assert_eq!(anthropic_image_tokens(Some((4000, 3000))), 1600);
        assert_eq!(anthropic_image_tokens(None), 1600);
    }

    #[test]
    fn counts_pdf_pages() {
        let pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n\
            2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >> endobj\n\
            3 0 obj << /Type /Page /Parent 2 0 R >> endobj\n\
            4 0 obj << /Type/Page /Parent 2 0 R >> endobj\n\
            5 0 obj << /Type /Page /Parent 2 0 R >> endobj\n%%EOF";
        let b64 = base64::engine::general_purpose::STANDARD.encode(pdf);
        assert_eq!(pdf_pages_base64(&b64), Some(3));
        assert_eq!(
            pdf_tokens_url(&format!("data:application/pdf;base64,{b64}")),
            6000
        );
        assert_eq!(pdf_tokens_url("https://example.com/x.pdf"), PDF_PAGE_TOKENS);
    }
}
