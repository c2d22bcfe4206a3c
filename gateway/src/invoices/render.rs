//! Invoice renderings (CSV, JSON, HTML) and the export that writes one file per invoice.
//!
//! Renderings depend on the invoice alone (no clock, no locale), so the same invoice always
//! renders to the same bytes. PDF is not offered: print the HTML if one is needed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rust_decimal::Decimal;

use super::{Invoice, InvoiceError, InvoiceLine};

/// An export format (`csv`, `json`, `html`; the CLI's `--format` lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Json,
    Html,
}

impl Format {
    /// The file extension.
    pub fn extension(&self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Html => "html",
        }
    }

    /// Renders one invoice.
    pub fn render(&self, invoice: &Invoice) -> Result<String, InvoiceError> {
        match self {
            Format::Csv => Ok(csv(invoice)),
            Format::Json => json(invoice),
            Format::Html => Ok(html(invoice)),
        }
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            other => Err(format!(
                "unknown format `{other}`: expected csv, json or html"
            )),
        }
    }
}

/// Pretty JSON (the admin API's invoice objects), newline-terminated.
pub fn json(invoice: &Invoice) -> Result<String, InvoiceError> {
    serde_json::to_string_pretty(invoice)
        .map(|s| s + "\n")
        .map_err(|e| InvoiceError::Output(format!("cannot encode invoice: {e}")))
}

/// One CSV cell. Text that a spreadsheet would run as a formula (it begins with `=`, `+`,
/// `-`, `@`, a tab or a carriage return: a tenant named `=HYPERLINK(...)`) is neutralised with
/// a leading `'`; numbers, negative amounts included, stay numbers.
fn csv_field(s: &str) -> String {
    let neutral;
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && Decimal::from_str(s).is_err() {
        neutral = format!("'{s}");
        neutral.as_str()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

const CSV_HEADER: &str = "invoice_number,tenant_id,tenant_name,period,status,issue_date,currency,\
kind,description,model,event_period,price_from,price_basis,input_per_mtok,cached_input_per_mtok,\
output_per_mtok,uncached_input_tokens,cached_input_tokens,cache_write_input_tokens,output_tokens,\
requests,cache_hits,discount_percent,cache_savings,amount";

/// CSV: a header, one row per line, then `subtotal`, `discounts`, `plan_fee` and `total`
/// rows (kind column) carrying only the amount, then one `note` row per note (description
/// column).
pub fn csv(invoice: &Invoice) -> String {
    let mut out = String::new();
    out.push_str(CSV_HEADER);
    out.push('\n');
    let head = [
        invoice.number.as_str(),
        invoice.tenant_id.as_str(),
        invoice.tenant_name.as_str(),
        invoice.period.as_str(),
        invoice.status.as_str(),
        invoice.issue_date.as_deref().unwrap_or(""),
        invoice.currency.as_str(),
    ]
    .map(csv_field)
    .join(",");
    for l in &invoice.lines {
        let q = l.quantities;
        let cells = [
            l.kind.as_str().to_string(),
            l.description.clone(),
            opt(l.model.as_deref()),
            opt(l.event_period.as_deref()),
            opt(l.price_from.as_deref()),
            opt(l.price_basis.map(|b| b.as_str())),
            opt(l.input_per_mtok),
            opt(l.cached_input_per_mtok),
            opt(l.output_per_mtok),
            opt(q.map(|q| q.uncached_input_tokens)),
            opt(q.map(|q| q.cached_input_tokens)),
            opt(q.map(|q| q.cache_write_input_tokens)),
            opt(q.map(|q| q.output_tokens)),
            opt(q.map(|q| q.requests)),
            opt(q.map(|q| q.cache_hits)),
            opt(l.discount_percent),
            opt(l.cache_savings),
            l.amount.to_string(),
        ];
        let cells: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
        let _ = writeln!(out, "{head},{}", cells.join(","));
    }
    for (kind, amount) in [
        ("subtotal", invoice.subtotal),
        ("discounts", invoice.discounts),
        ("plan_fee", invoice.plan_fee),
        ("total", invoice.total),
    ] {
        let _ = writeln!(out, "{head},{kind}{}{amount}", ",".repeat(17));
    }
    if !invoice.cache_savings.is_zero() {
        // Information in the cache_savings column, not an amount.
        let saved = invoice.cache_savings;
        let _ = writeln!(out, "{head},cache_savings{}{saved},", ",".repeat(16));
    }
    for note in &invoice.notes {
        let _ = writeln!(out, "{head},note,{}{}", csv_field(note), ",".repeat(16));
    }
    out
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn html_line(out: &mut String, l: &InvoiceLine, currency: &str) {
    let q = l.quantities;
    let units = match q {
        Some(q) => format!(
            "{} uncached input, {} cached input, {} cache-write input, {} output tokens; {} requests{}",
            q.uncached_input_tokens,
            q.cached_input_tokens,
            q.cache_write_input_tokens,
            q.output_tokens,
            q.requests,
            if q.cache_hits > 0 {
                format!(" ({} from the response cache)", q.cache_hits)
            } else {
                String::new()
            }
        ),
        None => String::new(),
    };
    let prices = match (l.input_per_mtok, l.cached_input_per_mtok, l.output_per_mtok) {
        (Some(i), Some(c), Some(o)) => {
            format!("input {i}, cached input {c}, output {o} {currency} per million tokens")
        }
        _ => l
            .discount_percent
            .map(|p| format!("{p}%"))
            .unwrap_or_default(),
    };
    let _ = writeln!(
        out,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
        esc(l.kind.as_str()),
        esc(&l.description),
        esc(&units),
        esc(&prices),
        esc(&l.amount.to_string())
    );
}

/// A self-contained HTML document (inline CSS, no scripts, no external resources).
pub fn html(invoice: &Invoice) -> String {
    let i = invoice;
    let cur = esc(&i.currency);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Invoice {}</title>",
        esc(&i.number)
    );
    out.push_str(
        "<style>\nbody{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}\n\
         h1{margin-bottom:.2em}\ntable{border-collapse:collapse;width:100%;margin:1em 0}\n\
         th,td{border-bottom:1px solid #ddd;padding:.4em .6em;text-align:left;vertical-align:top}\n\
         th{background:#f4f4f4}\n.num{text-align:right;white-space:nowrap}\n\
         .meta td{border:none;padding:.1em .6em}\n.totals td{border:none}\n\
         .total td{font-weight:bold;border-top:2px solid #222}\n\
         .draft{color:#b00;font-weight:bold}\nfooter{margin-top:2em;font-size:.85em;color:#555}\n\
         </style>\n</head>\n<body>\n",
    );
    let status = match i.status {
        super::InvoiceStatus::Final => "final".to_string(),
        super::InvoiceStatus::Draft => "<span class=\"draft\">DRAFT</span>".to_string(),
    };
    let _ = writeln!(out, "<h1>Invoice {}</h1>", esc(&i.number));
    let _ = writeln!(
        out,
        "<table class=\"meta\">\n<tr><td>Tenant</td><td>{} ({})</td></tr>\n\
         <tr><td>Period</td><td>{} ({} to {})</td></tr>\n\
         <tr><td>Issue date</td><td>{}</td></tr>\n<tr><td>Status</td><td>{status}</td></tr>\n\
         <tr><td>Currency</td><td>{cur}</td></tr>\n</table>",
        esc(&i.tenant_name),
        esc(&i.tenant_id),
        esc(&i.period),
        esc(&i.period_start),
        esc(&i.period_end),
        esc(i.issue_date.as_deref().unwrap_or("not issued (draft)")),
    );
    out.push_str(
        "<table class=\"lines\">\n<tr><th>Kind</th><th>Description</th><th>Units</th>\
         <th>Unit prices</th><th class=\"num\">Amount</th></tr>\n",
    );
    for l in &i.lines {
        html_line(&mut out, l, &i.currency);
    }
    out.push_str("</table>\n");
    if !i.notes.is_empty() {
        out.push_str("<ul class=\"notes\">\n");
        for note in &i.notes {
            let _ = writeln!(out, "<li>{}</li>", esc(note));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("<table class=\"totals\">\n");
    for (label, amount, class) in [
        ("Subtotal", i.subtotal, ""),
        ("Discounts", i.discounts, ""),
        ("Plan fee", i.plan_fee, ""),
        ("Total", i.total, " class=\"total\""),
    ] {
        let _ = writeln!(
            out,
            "<tr{class}><td>{label}</td><td class=\"num\">{} {cur}</td></tr>",
            esc(&amount.to_string())
        );
    }
    out.push_str(
        "</table>\n<footer>Amounts are in the invoice currency. Each line is the exact metered \
         cost rounded to 2 decimal places, half away from zero; a discount is the rounded \
         line amount times its percentage, rounded the same way; the total is the sum of the \
         rounded lines.</footer>\n</body>\n</html>\n",
    );
    out
}

/// Writes one `<number>.<ext>` file per invoice into `dir` (created if needed). Every file is
/// first written under a temporary name, then all are renamed: a failure leaves no invoice
/// file behind (temporary files are removed). Returns the paths written.
pub fn write_files(
    dir: &Path,
    invoices: &[Invoice],
    format: Format,
) -> Result<Vec<PathBuf>, InvoiceError> {
    let out_err = |what: &str, path: &Path, e: std::io::Error| {
        InvoiceError::Output(format!("cannot {what} {}: {e}", path.display()))
    };
    let rendered = invoices
        .iter()
        .map(|i| format.render(i).map(|text| (i, text)))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(dir).map_err(|e| out_err("create directory", dir, e))?;
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let cleanup = |staged: &[(PathBuf, PathBuf)]| {
        for (tmp, _) in staged {
            let _ = std::fs::remove_file(tmp);
        }
    };
    for (invoice, text) in &rendered {
        let name = format!("{}.{}", invoice.number, format.extension());
        // An unpredictable name, created only if nothing (not even a planted symlink) is
        // there yet.
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            cleanup(&staged);
            let _ = std::fs::remove_file(&tmp);
            return Err(out_err("write", &tmp, e));
        }
        staged.push((tmp, dir.join(name)));
    }
    let mut written = Vec::with_capacity(staged.len());
    for (tmp, path) in &staged {
        if let Err(e) = std::fs::rename(tmp, path) {
            cleanup(&staged);
            return Err(out_err("rename into", path, e));
        }
        written.push(path.clone());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::csv_field;

    #[test]
    fn csv_cells_that_would_be_formulas_are_neutralised_and_numbers_are_not() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1+1"), "'+1+1");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("-cmd"), "'-cmd");
        assert_eq!(csv_field("-1.25"), "-1.25");
        assert_eq!(csv_field("Acme, Inc."), "\"Acme, Inc.\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let invoice = super::super::tests::sample_invoice();
        // The name the old scheme used, planted.
        let name = format!(".{}.csv.tmp-{}", invoice.number, std::process::id());
        std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        let written = super::write_files(
            dir.path(),
            std::slice::from_ref(&invoice),
            super::Format::Csv,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(std::fs::read_to_string(&written[0])
            .unwrap()
            .contains(&invoice.number));
    }
}
