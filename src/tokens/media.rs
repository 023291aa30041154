//! Token approximations for input parts that are not text: images, audio and files.
//!
//! Providers bill these by rules that depend on data we often cannot see (an image behind a
//! URL, a file uploaded earlier). Each function states the rule it follows and how far off it
//! can be. Where the request carries the bytes inline (base64 or a data URL) the image header or
//! PDF page structure is read to do better than a fixed guess.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{Encoding, count};

/// Width and height of an image in pixels.
pub(crate) type Dimensions = (u32, u32);

/// OpenAI: an image we cannot measure is taken as 1024×1024 (the brief's typical upload):
/// 4 high-detail tiles. The largest possible high-detail bill is 8 tiles (a 768×2048 image
/// after scaling), so an unknown tall image can be under-estimated by up to 680 tokens.
const OPENAI_UNKNOWN_IMAGE: Dimensions = (1024, 1024);

/// Anthropic bills `width × height / 750` after scaling an image to at most 1568 px on the
/// long edge and about 1.15 megapixels, so ~1600 tokens (a 1092×1092 image) is the most an
/// image can cost; an image we cannot measure is taken at that maximum.
const ANTHROPIC_MAX_IMAGE_TOKENS: u64 = 1600;

/// Files (PDFs) are given to the model as the extracted text plus an image of every page;
/// Anthropic documents 1,500–3,000 tokens per page depending on density, OpenAI's rendering is
/// similar (page text plus one high-detail page image of ~765–1105 tokens). We take 2,000.
const TOKENS_PER_PDF_PAGE: u64 = 2000;

/// When the page count cannot be read (compressed object streams, encryption), assume one page
/// per 50 KB of file, a typical size for PDFs that carry both text and images. Text-only PDFs
/// are smaller per page, so this under-counts them; scanned ones are larger and over-count.
const PDF_BYTES_PER_PAGE_GUESS: u64 = 50_000;

/// A file referenced by id or URL: its size is unknown; we hold one page's worth.
pub(crate) const UNKNOWN_FILE_TOKENS: u64 = TOKENS_PER_PDF_PAGE;

/// OpenAI bills audio input at about 10 tokens per second (one per 100 ms). Bytes per second
/// depend on the format: 16-bit mono WAV is 32 KB/s at 16 kHz (48 KB/s at 24 kHz) and MP3 is
/// typically 16 KB/s (128 kbit/s). Taking the smaller byte rate for each over-counts
/// higher-quality audio (by up to 1.5× for 24 kHz WAV) rather than under-counting it; MP3 below
/// 128 kbit/s is under-counted proportionally.
const AUDIO_BYTES_PER_TOKEN_WAV: u64 = 3200;
const AUDIO_BYTES_PER_TOKEN_COMPRESSED: u64 = 1600;

/// At most this many base64 characters are decoded to find an image's size: PNG, GIF and WebP
/// keep it in the first 30 bytes; JPEG after its metadata segments, which rarely exceed 64 KB.
const SNIFF_BASE64_CHARS: usize = 88 * 1024;

/// The base64 payload of a data URL (`data:image/png;base64,AAAA`) or of a bare base64 string.
pub(crate) fn base64_payload(data: &str) -> &str {
    match data.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map_or("", |(_, payload)| payload),
        None => data,
    }
}

/// The media type of a data URL, when `data` is one.
pub(crate) fn data_url_media_type(data: &str) -> Option<&str> {
    let rest = data.strip_prefix("data:")?;
    let (meta, _) = rest.split_once(',')?;
    Some(meta.split(';').next().unwrap_or(""))
}

/// Decoded size of a base64 payload, without decoding it (padding ignored: ±2 bytes).
pub(crate) fn decoded_len(b64: &str) -> u64 {
    (b64.len() as u64).saturating_mul(3) / 4
}

/// Pixel size of a base64 (or data URL) image, read from its header. `None` for URLs, unknown
/// formats and damaged data.
pub(crate) fn image_dimensions(data: &str) -> Option<Dimensions> {
    let payload = base64_payload(data);
    // Decode a prefix that is a whole number of base64 quanta; padding can only occur in the
    // last quantum of the full string, so a shorter prefix never contains it.
    let take = payload.len().min(SNIFF_BASE64_CHARS) / 4 * 4;
    let bytes = STANDARD.decode(payload.get(..take)?).ok()?;
    let dims = sniff_dimensions(&bytes)?;
    (dims.0 > 0 && dims.1 > 0).then_some(dims)
}

fn be16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
    ])))
}

fn le16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_le_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
    ])))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        0,
    ]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Reads width and height from a PNG, GIF, WebP or JPEG header.
pub(crate) fn sniff_dimensions(b: &[u8]) -> Option<Dimensions> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        // The IHDR chunk always comes first: width and height at bytes 16 and 20.
        return Some((be32(b, 16)?, be32(b, 20)?));
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        return Some((le16(b, 6)?, le16(b, 8)?));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        return match b.get(12..16)? {
            b"VP8 " => Some((le16(b, 26)? & 0x3fff, le16(b, 28)? & 0x3fff)),
            b"VP8L" => {
                let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            b"VP8X" => Some((le24(b, 24)? + 1, le24(b, 27)? + 1)),
            _ => None,
        };
    }
    if b.starts_with(&[0xff, 0xd8]) {
        return jpeg_dimensions(b);
    }
    None
}

/// Walks JPEG segments to the first start-of-frame marker.
fn jpeg_dimensions(b: &[u8]) -> Option<Dimensions> {
    let mut at = 2;
    loop {
        // Markers may be preceded by any number of 0xff fill bytes.
        while *b.get(at)? == 0xff && *b.get(at + 1)? == 0xff {
            at += 1;
        }
        if *b.get(at)? != 0xff {
            return None;
        }
        let marker = *b.get(at + 1)?;
        match marker {
            // Stand-alone markers without a length.
            0x01 | 0xd0..=0xd7 => at += 2,
            // SOF0..SOF15 except DHT (c4), JPG (c8) and DAC (cc): height, then width.
            0xc0..=0xcf if !matches!(marker, 0xc4 | 0xc8 | 0xcc) => {
                return Some((be16(b, at + 7)?, be16(b, at + 5)?));
            }
            // Start of scan or end of image before any frame header: damaged.
            0xd9 | 0xda => return None,
            _ => at += 2 + usize::try_from(be16(b, at + 2)?).ok()?,
        }
    }
}

/// OpenAI high-detail tiling: fit within 2048×2048, then shrink so the short side is at most
/// 768 px, then count 512 px tiles.
fn openai_tiles((w, h): Dimensions) -> u64 {
    let (mut w, mut h) = (u64::from(w.max(1)), u64::from(h.max(1)));
    let long = w.max(h);
    if long > 2048 {
        w = (w * 2048).div_ceil(long);
        h = (h * 2048).div_ceil(long);
    }
    let short = w.min(h);
    if short > 768 {
        w = (w * 768).div_ceil(short);
        h = (h * 768).div_ceil(short);
    }
    w.div_ceil(512) * h.div_ceil(512)
}

/// Tokens OpenAI bills for one image part of a chat or Responses request.
///
/// GPT-4o-style billing: 85 tokens for `detail: "low"`, otherwise 85 + 170 per 512 px tile
/// (765 for 1024×1024). `gpt-4o-mini` bills the same shape at 2833 + 5667 per tile. Models that
/// bill by 32 px patches instead (`gpt-4.1-mini`, `gpt-4.1-nano`, `o4-mini`) are estimated with
/// the tile rule, which is within about ±50 % of their patch count for common sizes.
pub(crate) fn openai_image_tokens(
    model: &str,
    detail: Option<&str>,
    dims: Option<Dimensions>,
) -> u64 {
    let (base, per_tile) = if model.to_ascii_lowercase().starts_with("gpt-4o-mini") {
        (2833, 5667)
    } else {
        (85, 170)
    };
    if detail == Some("low") {
        return base;
    }
    base + per_tile * openai_tiles(dims.unwrap_or(OPENAI_UNKNOWN_IMAGE))
}

/// Tokens Anthropic bills for one image block: `width × height / 750` after its resizing
/// (long edge ≤ 1568 px, area ≤ ~1.15 MP), at most ~1600; 1600 when the size is unknown.
pub(crate) fn anthropic_image_tokens(dims: Option<Dimensions>) -> u64 {
    let Some((w, h)) = dims else {
        return ANTHROPIC_MAX_IMAGE_TOKENS;
    };
    let (mut w, mut h) = (u64::from(w), u64::from(h));
    let long = w.max(h);
    if long > 1568 {
        w = (w * 1568).div_ceil(long);
        h = (h * 1568).div_ceil(long);
    }
    (w * h).div_ceil(750).min(ANTHROPIC_MAX_IMAGE_TOKENS)
}

/// Tokens for an inline audio part given its base64 length and declared format.
pub(crate) fn audio_tokens(b64_len: usize, format: Option<&str>) -> u64 {
    let bytes = (b64_len as u64).saturating_mul(3) / 4;
    let per_token = match format {
        Some("wav" | "pcm16") => AUDIO_BYTES_PER_TOKEN_WAV,
        _ => AUDIO_BYTES_PER_TOKEN_COMPRESSED,
    };
    bytes.div_ceil(per_token)
}

/// Tokens for an inline file (base64 or data URL): text files are decoded and counted; PDFs
/// are billed per page (pages read from the document, else guessed from its size).
pub(crate) fn inline_file_tokens(enc: Encoding, data: &str, media_type: Option<&str>) -> u64 {
    let payload = base64_payload(data);
    let media_type = data_url_media_type(data).or(media_type).unwrap_or("");
    let decoded = STANDARD.decode(payload.trim()).ok();
    if (media_type.starts_with("text/") || media_type.ends_with("json"))
        && let Some(text) = decoded.as_deref().and_then(|b| std::str::from_utf8(b).ok())
    {
        return count(enc, text) as u64;
    }
    let pages = decoded.as_deref().map_or(0, pdf_page_count);
    let pages = if pages > 0 {
        pages
    } else {
        decoded_len(payload)
            .div_ceil(PDF_BYTES_PER_PAGE_GUESS)
            .max(1)
    };
    pages.saturating_mul(TOKENS_PER_PDF_PAGE)
}

/// Counts `/Type /Page` dictionaries (not `/Pages`) in a PDF. Returns 0 when none are
/// visible, e.g. when page objects sit in compressed object streams.
pub(crate) fn pdf_page_count(pdf: &[u8]) -> u64 {
    let mut pages = 0;
    let mut rest = pdf;
    while let Some(pos) = find(rest, b"/Type") {
        rest = &rest[pos + 5..];
        let after = rest
            .iter()
            .position(|c| !c.is_ascii_whitespace())
            .map_or(&[][..], |skip| &rest[skip..]);
        if after.starts_with(b"/Page") && !after[5..].first().is_some_and(u8::is_ascii_alphanumeric)
        {
            pages += 1;
        }
    }
    pages
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        v.extend(w.to_be_bytes());
        v.extend(h.to_be_bytes());
        v.extend([8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn reads_png_gif_webp_and_jpeg_sizes() {
        assert_eq!(image_dimensions(&b64(&png(1092, 1092))), Some((1092, 1092)));
        let data_url = format!("data:image/png;base64,{}", b64(&png(300, 200)));
        assert_eq!(image_dimensions(&data_url), Some((300, 200)));

        let mut gif = b"GIF89a".to_vec();
        gif.extend(640u16.to_le_bytes());
        gif.extend(480u16.to_le_bytes());
        gif.extend([0, 0, 0]);
        assert_eq!(sniff_dimensions(&gif), Some((640, 480)));

        let mut webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        webp.extend(&(1999u32).to_le_bytes()[..3]);
        webp.extend(&(999u32).to_le_bytes()[..3]);
        assert_eq!(sniff_dimensions(&webp), Some((2000, 1000)));

        // SOI, an APP0 segment of 16 bytes, then SOF0 with height 600 and width 800.
        let mut jpeg = vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10];
        jpeg.extend([0u8; 14]);
        jpeg.extend([0xff, 0xc0, 0x00, 0x11, 0x08, 0x02, 0x58, 0x03, 0x20, 0x03]);
        assert_eq!(sniff_dimensions(&jpeg), Some((800, 600)));
    }

    #[test]
    fn damaged_or_remote_images_have_no_size() {
        assert_eq!(image_dimensions("https://example.com/cat.png"), None);
        assert_eq!(image_dimensions("data:image/png;base64,!!!!"), None);
        assert_eq!(image_dimensions(""), None);
        assert_eq!(sniff_dimensions(&[0xff, 0xd8, 0xff, 0xda]), None);
        assert_eq!(
            sniff_dimensions(&[0xff, 0xd8, 0xff, 0xe0, 0xff, 0xff]),
            None
        );
        assert_eq!(sniff_dimensions(b"\x89PNG\r\n\x1a\n\0\0"), None);
    }

    #[test]
    fn openai_tiles_follow_the_published_examples() {
        // OpenAI's pricing examples: 1024×1024 high → 765; 2048×4096 → 1105; low → 85.
        assert_eq!(openai_image_tokens("gpt-4o", None, Some((1024, 1024))), 765);
        assert_eq!(
            openai_image_tokens("gpt-4o", Some("high"), Some((2048, 4096))),
            1105
        );
        assert_eq!(
            openai_image_tokens("gpt-4o", Some("low"), Some((4096, 4096))),
            85
        );
        assert_eq!(openai_image_tokens("gpt-4o", Some("auto"), None), 765);
        assert_eq!(openai_image_tokens("gpt-4o-mini", Some("low"), None), 2833);
        assert_eq!(openai_image_tokens("gpt-4o", None, Some((1, 1))), 255);
    }

    #[test]
    fn anthropic_images_follow_area_over_750() {
        assert_eq!(anthropic_image_tokens(Some((1092, 1092))), 1590);
        assert_eq!(anthropic_image_tokens(Some((200, 200))), 54);
        assert_eq!(anthropic_image_tokens(Some((8000, 8000))), 1600);
        assert_eq!(anthropic_image_tokens(None), 1600);
    }

    #[test]
    fn files_are_billed_per_page_or_counted_as_text() {
        let pdf = b"%PDF-1.4\n1 0 obj <</Type /Pages /Count 2>>\n2 0 obj <</Type /Page>>\n3 0 obj <</Type/Page/Parent 1 0 R>>\n";
        assert_eq!(pdf_page_count(pdf), 2);
        let url = format!("data:application/pdf;base64,{}", b64(pdf));
        assert_eq!(
            inline_file_tokens(Encoding::O200k, &url, None),
            2 * TOKENS_PER_PDF_PAGE
        );

        let text = "hello world, a plain text file";
        let url = format!("data:text/plain;base64,{}", b64(text.as_bytes()));
        assert_eq!(
            inline_file_tokens(Encoding::O200k, &url, None),
            count(Encoding::O200k, text) as u64
        );
        // Not base64 at all: falls back to the size guess, at least one page.
        assert_eq!(
            inline_file_tokens(Encoding::O200k, "%%%", None),
            TOKENS_PER_PDF_PAGE
        );
    }

    #[test]
    fn audio_scales_with_duration() {
        // One second of 16 kHz 16-bit mono WAV is 32 000 bytes: about 10 tokens.
        let b64_len = 32_000 * 4 / 3;
        assert_eq!(audio_tokens(b64_len, Some("wav")), 10);
        assert_eq!(audio_tokens(b64_len, Some("mp3")), 20);
        assert_eq!(audio_tokens(0, None), 0);
    }
}
