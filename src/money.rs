//! Money as integer micro-dollars, and exact decimal text for it.
//!
//! Every amount of money in tollgate — limits, reservations, costs, ledger columns — is an `i64`
//! count of micro-USD ([`Micros`]); a float never holds money. This module owns the only
//! conversions between that integer and text:
//!
//! * [`parse_usd`] reads a non-negative decimal (`"5"`, `"2.5"`, `"0.000001"`) exactly, refusing
//!   anything a micro-dollar cannot represent (more than 6 decimals) instead of rounding it;
//! * [`format_usd`] writes the fixed 6-decimal form of the JSON APIs (`"4.250000"`);
//! * [`format_usd_short`] writes the shortest exact form used inside limit specs (`"5"`, `"2.5"`),
//!   which [`parse_usd`] reads back to the same value.
//!
//! [`parse_decimal`] is the underlying exact fixed-point reader, shared with the price table
//! (which uses 9 decimals).

use thiserror::Error;

/// An amount of money in micro-USD (1 USD = 1 000 000).
///
/// A plain alias rather than a newtype: the value crosses SQL columns, Redis scripts and JSON
/// as a bare integer everywhere, and every arithmetic site already wants `checked_*` /
/// `saturating_*` on `i64`. Its range (±9.2 × 10¹² USD) is far beyond any budget.
pub type Micros = i64;

/// Micro-dollars in one US dollar.
pub const MICROS_PER_USD: Micros = 1_000_000;

/// Decimal places of a [`Micros`] amount written as dollars.
pub const USD_DECIMALS: u32 = 6;

/// Why a decimal string could not be read as an exact non-negative fixed-point number.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecimalError {
    /// The text was empty.
    #[error("empty number")]
    Empty,
    /// The text started with `-`.
    #[error("negative amount `{0}` is not allowed")]
    Negative(String),
    /// The text was not `DIGITS[.DIGITS]`.
    #[error(
        "`{0}` is not a decimal number (expected digits with an optional `.` fraction, e.g. `2.5`)"
    )]
    Syntax(String),
    /// More fractional digits than the unit can hold; rounding silently would change the amount.
    #[error("`{text}` has more than {max} decimal places")]
    TooPrecise {
        /// The offending text.
        text: String,
        /// Decimal places allowed.
        max: u32,
    },
    /// The scaled value does not fit in an `i64`.
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Reads `text` as a non-negative decimal scaled by `10^decimals`, exactly.
///
/// Accepted: `DIGITS` or `DIGITS.DIGITS` (ASCII digits, at least one on each side of the dot).
/// Rejected: signs, exponents, whitespace, `inf`/`NaN`, more than `decimals` fractional digits
/// (trailing zeros beyond that are refused too, to keep the rule simple and visible), and values
/// whose scaled form overflows `i64`.
///
/// `parse_decimal("0.075", 9) == Ok(75_000_000)`.
pub fn parse_decimal(text: &str, decimals: u32) -> Result<i64, DecimalError> {
    if text.is_empty() {
        return Err(DecimalError::Empty);
    }
    if text.starts_with('-') {
        return Err(DecimalError::Negative(text.to_owned()));
    }
    let (int_part, frac_part) = match text.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (text, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || frac_part.is_some_and(|f| !all_digits(f)) {
        return Err(DecimalError::Syntax(text.to_owned()));
    }
    let frac = frac_part.unwrap_or("");
    if frac.len() > decimals as usize {
        return Err(DecimalError::TooPrecise {
            text: text.to_owned(),
            max: decimals,
        });
    }
    let overflow = || DecimalError::Overflow(text.to_owned());
    let scale = 10i64.checked_pow(decimals).ok_or_else(overflow)?;
    let mut int_value: i64 = 0;
    for b in int_part.bytes() {
        int_value = int_value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(b - b'0')))
            .ok_or_else(overflow)?;
    }
    let mut frac_value: i64 = 0;
    for b in frac.bytes() {
        // Cannot overflow: at most `decimals` digits and 10^decimals fits (checked above).
        frac_value = frac_value * 10 + i64::from(b - b'0');
    }
    // Pad the fraction to `decimals` digits: "2.5" at 6 decimals is 2 * 10^6 + 5 * 10^5.
    let pad = 10i64
        .checked_pow(decimals - frac.len() as u32)
        .ok_or_else(overflow)?;
    int_value
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_value * pad))
        .ok_or_else(overflow)
}

/// Reads a dollar amount (`"5"`, `"2.5"`, `"0.000001"`) as exact micro-dollars.
///
/// Errors on negatives, more than 6 decimals, bad syntax and overflow (see [`parse_decimal`]).
pub fn parse_usd(text: &str) -> Result<Micros, DecimalError> {
    parse_decimal(text, USD_DECIMALS)
}

/// Writes micro-dollars with exactly 6 decimals, as the JSON APIs do: `4_250_000 → "4.250000"`.
///
/// Negative amounts (which only corrections can produce) get a leading `-`.
pub fn format_usd(micros: Micros) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    // unsigned_abs: i64::MIN has no positive i64 counterpart.
    let abs = micros.unsigned_abs();
    let per = MICROS_PER_USD.unsigned_abs();
    format!("{sign}{}.{:06}", abs / per, abs % per)
}

/// Writes micro-dollars in the shortest exact decimal form: `5_000_000 → "5"`,
/// `2_500_000 → "2.5"`, `1 → "0.000001"`. Used for the canonical text of limit specs;
/// [`parse_usd`] reads it back to the same value.
pub fn format_usd_short(micros: Micros) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let per = MICROS_PER_USD.unsigned_abs();
    let (whole, frac) = (abs / per, abs % per);
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let digits = format!("{frac:06}");
        format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_amounts() {
        assert_eq!(parse_usd("5"), Ok(5_000_000));
        assert_eq!(parse_usd("2.5"), Ok(2_500_000));
        assert_eq!(parse_usd("0.000001"), Ok(1));
        assert_eq!(parse_usd("0"), Ok(0));
        assert_eq!(parse_usd("0.0"), Ok(0));
        assert_eq!(parse_usd("12.345678"), Ok(12_345_678));
        assert_eq!(parse_usd("007.10"), Ok(7_100_000));
        assert_eq!(parse_decimal("0.075", 9), Ok(75_000_000));
        assert_eq!(parse_decimal("15", 9), Ok(15_000_000_000));
        assert_eq!(parse_decimal("42", 0), Ok(42));
    }

    #[test]
    fn rejects_what_micros_cannot_hold() {
        assert_eq!(parse_usd(""), Err(DecimalError::Empty));
        assert!(matches!(parse_usd("-1"), Err(DecimalError::Negative(_))));
        assert!(matches!(parse_usd("-0"), Err(DecimalError::Negative(_))));
        assert!(matches!(
            parse_usd("0.0000001"),
            Err(DecimalError::TooPrecise { max: 6, .. })
        ));
        assert!(matches!(
            parse_usd("1.0000000"),
            Err(DecimalError::TooPrecise { .. })
        ));
        for bad in [
            "+1", "1e3", ".5", "5.", "1.2.3", " 1", "1 ", "NaN", "inf", "1,5", "0x10", "٣",
        ] {
            assert!(
                matches!(parse_usd(bad), Err(DecimalError::Syntax(_))),
                "{bad:?} should be a syntax error"
            );
        }
        // i64::MAX micros is 9223372036854.775807 USD.
        assert_eq!(parse_usd("9223372036854.775807"), Ok(i64::MAX));
        assert!(matches!(
            parse_usd("9223372036854.775808"),
            Err(DecimalError::Overflow(_))
        ));
        assert!(matches!(
            parse_usd("99999999999999999999999"),
            Err(DecimalError::Overflow(_))
        ));
    }

    #[test]
    fn formats_fixed_and_short() {
        assert_eq!(format_usd(4_250_000), "4.250000");
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(-500_000), "-0.500000");
        assert_eq!(format_usd(i64::MIN), "-9223372036854.775808");
        assert_eq!(format_usd_short(5_000_000), "5");
        assert_eq!(format_usd_short(2_500_000), "2.5");
        assert_eq!(format_usd_short(1), "0.000001");
        assert_eq!(format_usd_short(0), "0");
        assert_eq!(format_usd_short(10_000_000), "10");
        assert_eq!(format_usd_short(-1_250_000), "-1.25");
    }

    proptest! {
        #[test]
        fn short_and_fixed_forms_round_trip(m in 0i64..=i64::MAX) {
            prop_assert_eq!(parse_usd(&format_usd_short(m)), Ok(m));
            prop_assert_eq!(parse_usd(&format_usd(m)), Ok(m));
        }

        #[test]
        fn decimal_matches_integer_arithmetic(whole in 0u32..1_000_000, frac in 0u32..1_000_000) {
            let text = format!("{whole}.{frac:06}");
            prop_assert_eq!(parse_usd(&text), Ok(i64::from(whole) * 1_000_000 + i64::from(frac)));
        }
    }
}
