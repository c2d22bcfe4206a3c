"""Writes tests/pii/testset.jsonl: a synthetic, labelled PII test set in six languages.

Values come from the Faker package (its own lists of names, phone formats, IBANs and
card numbers per locale, not the gateway's), secrets and NHS numbers from the generators
below; each sentence template is filled with them and every value's byte span is recorded.
Negative sentences hold look-alikes (order numbers, dates, versions, hashes, numbers that fail
Luhn, mod-97 or mod-11) and must give no detection.

    python3 -m venv /tmp/pii-venv && /tmp/pii-venv/bin/pip install faker==37.12.0
    /tmp/pii-venv/bin/python tests/pii/generate.py > tests/pii/testset.jsonl
    /tmp/pii-venv/bin/python tests/pii/generate.py 7 > tests/pii/holdout.jsonl

Deterministic for a given Faker version and seed. The detectors were tuned while looking at
`testset.jsonl` only; `holdout.jsonl` (another seed: other values, same templates) was
generated afterwards, to tell how much of the tuning was fitting this one set. Faker's Maestro numbers (12 digits) are not
used: the detector does not take 12-digit numbers for cards.
"""

import json
import random
import string
import sys

from faker import Faker

SEED = 20261208
LOCALES = {
    "en": "en_US",
    "gb": "en_GB",
    "de": "de_DE",
    "fr": "fr_FR",
    "es": "es_ES",
    "it": "it_IT",
    "nl": "nl_NL",
}
CARD_TYPES = ["visa13", "visa16", "visa19", "mastercard", "amex", "discover", "diners", "jcb15", "jcb16"]

# Templates: {kind} slots are filled with a value of that kind; the text around them is the
# sentence. Languages share slots; gb uses the English templates.
TEMPLATES = {
    "en": [
        "Hi, this is {NAME}. You can reach me at {EMAIL} or on {PHONE}.",
        "Please charge my card {CARD} for the renewal and send the receipt to {EMAIL}.",
        "My SSN is {SSN} and my date of birth is 1984-03-12.",
        "Wire the refund to IBAN {IBAN}, account holder {NAME}.",
        "The server at {IP} keeps rejecting logins from {NAME}.",
        "Here is the config: OPENAI_API_KEY={SECRET} (please keep it private).",
        "Customer {NAME} ({EMAIL}) called from {PHONE} about order 48213.",
        "Patient {NAME}, NHS number {NHS}, was seen on Tuesday.",
        "Can you debug this? ssh deploy@{IP} -i key.pem fails with code 255.",
        "Forwarding to {NAME}: card ending {CARD}, phone {PHONE}.",
        "Dear {NAME}, we received your application (SSN {SSN}).",
        "Summarize the complaint from {EMAIL} about the invoice paid with {CARD}.",
        "My colleague {NAME} pasted {SECRET} into the chat by mistake.",
        "Call {PHONE} and ask for {NAME}.",
        "Traffic from {IP} and {IP} spiked at 3 am.",
        "Employee {NAME}, SSN {SSN}, starts on 2025-01-06.",
        "Social Security number: {SSN}",
        "Her NHS number is {NHS} and her GP is Dr. {NAME}.",
        "NHS no. {NHS}, registered with the practice since 2019.",
    ],
    "de": [
        "Hallo, ich bin {NAME}. Erreichbar unter {EMAIL} oder {PHONE}.",
        "Bitte überweisen Sie den Betrag auf IBAN {IBAN} (Kontoinhaber {NAME}).",
        "Meine Kreditkarte {CARD} wurde zweimal belastet.",
        "Der Rechner {IP} ist seit gestern nicht erreichbar, sagt {NAME}.",
        "Rückruf an {NAME} unter {PHONE}, Betreff Vertrag 2024-117.",
        "Schlüssel für die Staging-Umgebung: {SECRET}",
        "Frau {NAME} hat die Rechnung per E-Mail an {EMAIL} erhalten.",
        "Herr {NAME} möchte die Zahlung mit Karte {CARD} stornieren.",
    ],
    "fr": [
        "Bonjour, je m'appelle {NAME}, mon adresse est {EMAIL}.",
        "Merci de rappeler {NAME} au {PHONE} avant vendredi.",
        "Virement sur l'IBAN {IBAN} au nom de {NAME}.",
        "Ma carte {CARD} a été débitée deux fois.",
        "Le serveur {IP} ne répond plus depuis la mise à jour.",
        "Voici le jeton d'accès : {SECRET}",
        "Mme {NAME} a écrit depuis {EMAIL} au sujet du contrat.",
    ],
    "es": [
        "Hola, soy {NAME}; mi correo es {EMAIL} y mi teléfono {PHONE}.",
        "Por favor, haga la transferencia al IBAN {IBAN}, titular {NAME}.",
        "Me cobraron dos veces en la tarjeta {CARD}.",
        "La máquina {IP} no responde desde ayer.",
        "La clave de la API es {SECRET}, no la compartas.",
        "Llame a {NAME} al {PHONE} mañana.",
    ],
    "it": [
        "Ciao, sono {NAME}, scrivimi a {EMAIL} o chiamami al {PHONE}.",
        "Effettuare il bonifico sull'IBAN {IBAN} intestato a {NAME}.",
        "La carta {CARD} è stata addebitata due volte.",
        "Il server {IP} non risponde, segnalato da {NAME}.",
        "Token di accesso: {SECRET}",
    ],
    "nl": [
        "Hoi, ik ben {NAME}, mail me op {EMAIL} of bel {PHONE}.",
        "Maak het bedrag over naar IBAN {IBAN} t.n.v. {NAME}.",
        "Mijn creditcard {CARD} is twee keer belast.",
        "De server {IP} reageert niet meer, meldt {NAME}.",
        "API-sleutel: {SECRET}",
    ],
}

NEGATIVES = [
    "Order #{ORDER} shipped on 2024-11-03 and arrives by 2024-11-07.",
    "Upgrade from v{VERSION} to v{VERSION} before the 14:30 maintenance window.",
    "The build hash is {HEX} and the artifact id {UUID}.",
    "Invoice {INVOICE} totals $1,284.50 (tax 19%).",
    "Reference number {BADCARD} was rejected by the bank.",
    "Tracking code {TRACKING} - delivery expected Monday.",
    "ISBN {ISBN}, 3rd edition, 412 pages.",
    "Coordinates 48.8566, 2.3522 mark the meeting point.",
    "The experiment ran {BIGNUM} iterations in 12.5 seconds.",
    "Account {BADIBAN} is not a valid IBAN.",
    "Room 1204, building B, floor 12; badge {BADGE}.",
    "Population grew from 3,456,789 to 3,502,114 between 2019 and 2023.",
    "Error 0x{HEXSHORT} at offset {BIGNUM}; retry in 500 ms.",
    "The model sk-small is cheaper than gpt-4o-mini for this task.",
    "Kubernetes pod web-7d9f8b6c5-x2x9z restarted 3 times.",
    "Der Vertrag Nr. {ORDER} läuft am 31.12.2025 aus.",
    "La facture n° {INVOICE} est payable sous 30 jours.",
    "El pedido {ORDER} se envió el 03/11/2024.",
    "Il lotto {BIGNUM} scade il 15.06.2025.",
    "Bestelling {ORDER} is onderweg, verwacht op 2024-12-02.",
    "New York and San Francisco offices open on Monday, March 3.",
    "The Golden Gate Bridge and Central Park were on the itinerary.",
    "Reading Rainbow and Sesame Street aired on public television.",
    "Use the Python Software Foundation license for this package.",
    "Apple Pay and Google Wallet are both accepted at checkout.",
    "Patient record {BADNHS} failed the checksum and was flagged.",
    "SSN-like code {BADSSN} is a test value.",
]


def nhs_number(rng):
    while True:
        d = [rng.randrange(10) for _ in range(9)]
        r = 11 - sum(x * (10 - i) for i, x in enumerate(d)) % 11
        if r == 11:
            r = 0
        if r != 10:
            s = "".join(map(str, d + [r]))
            return rng.choice([f"{s[:3]} {s[3:6]} {s[6:]}", s, f"{s[:3]}-{s[3:6]}-{s[6:]}"])


def bad_nhs(rng):
    while True:
        d = [rng.randrange(10) for _ in range(10)]
        r = 11 - sum(x * (10 - i) for i, x in enumerate(d[:9])) % 11
        if (0 if r == 11 else r) != d[9]:
            s = "".join(map(str, d))
            return f"{s[:3]} {s[3:6]} {s[6:]}"


def token(rng, alphabet, n):
    return "".join(rng.choice(alphabet) for _ in range(n))


def secret(rng):
    an = string.ascii_letters + string.digits
    kind = rng.randrange(7)
    if kind == 0:
        return "AKIA" + token(rng, string.ascii_uppercase + string.digits, 16)
    if kind == 1:
        return "ghp_" + token(rng, an, 36)
    if kind == 2:
        return "sk-proj-" + token(rng, an + "-_", 48)
    if kind == 3:
        return "sk-ant-api03-" + token(rng, an + "-_", 40)
    if kind == 4:
        return "xoxb-" + "-".join(token(rng, string.digits, 12) for _ in range(2)) + "-" + token(rng, an, 24)
    if kind == 5:
        return "AIza" + token(rng, an + "-_", 35)
    body = "\n".join(token(rng, an + "+/", 64) for _ in range(4))
    return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"


def luhn_ok(digits):
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def group(number, rng):
    style = rng.randrange(3)
    if style == 0 or len(number) not in (15, 16):
        return number
    if len(number) == 15:
        parts = [number[:4], number[4:10], number[10:]]
    else:
        parts = [number[i : i + 4] for i in range(0, 16, 4)]
    return (" " if style == 1 else "-").join(parts)


class Filler:
    def __init__(self, rng, fakers):
        self.rng = rng
        self.fakers = fakers

    def value(self, kind, lang):
        rng = self.rng
        f = self.fakers[lang]
        if kind == "NAME":
            return f"{f.first_name()} {f.last_name()}"
        if kind == "EMAIL":
            e = f.email()
            if rng.random() < 0.3:
                local, domain = e.split("@")
                e = f"{local}+{rng.choice(['news', 'work', 'x1'])}@mail.{domain}"
            return e
        if kind == "PHONE":
            return f.phone_number()
        if kind == "CARD":
            return group(f.credit_card_number(card_type=rng.choice(CARD_TYPES)), rng)
        if kind == "IBAN":
            iban = self.fakers[rng.choice(["de", "fr", "es", "it", "nl", "gb"])].iban()
            if rng.random() < 0.5:
                iban = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
            return iban
        if kind == "SSN":
            return self.fakers["en"].ssn()
        if kind == "NHS":
            return nhs_number(rng)
        if kind == "IP":
            return rng.choice([f.ipv4_public(), f.ipv4_private(), f.ipv6()])
        if kind == "SECRET":
            return secret(rng)
        raise ValueError(kind)

    def negative(self, slot):
        rng = self.rng
        if slot == "ORDER":
            return str(rng.randrange(10**5, 10**8))
        if slot == "VERSION":
            return f"{rng.randrange(1, 20)}.{rng.randrange(0, 40)}.{rng.randrange(0, 99)}"
        if slot == "HEX":
            return token(rng, "0123456789abcdef", 40)
        if slot == "HEXSHORT":
            return token(rng, "0123456789ABCDEF", 8)
        if slot == "UUID":
            return self.fakers["en"].uuid4()
        if slot == "INVOICE":
            return f"INV-{rng.randrange(2019, 2026)}-{rng.randrange(1, 99999):05d}"
        if slot == "BADCARD":
            while True:
                n = str(rng.randrange(4 * 10**15, 5 * 10**15))
                if not luhn_ok(n):
                    return n
        if slot == "TRACKING":
            return "1Z" + token(rng, string.ascii_uppercase + string.digits, 16)
        if slot == "ISBN":
            return f"978-{rng.randrange(0, 10)}-{rng.randrange(10, 99)}-{rng.randrange(100000, 999999)}-{rng.randrange(0, 10)}"
        if slot == "BIGNUM":
            return str(rng.randrange(10**3, 10**7))
        if slot == "BADIBAN":
            iban = self.fakers["de"].iban()
            check = int(iban[2:4])
            return iban[:2] + f"{(check + 1) % 97 + 2:02d}" + iban[4:]
        if slot == "BADGE":
            return f"{rng.randrange(100, 999)}-{rng.randrange(10, 99)}"
        if slot == "BADNHS":
            return bad_nhs(rng)
        if slot == "BADSSN":
            return f"{rng.choice(['000', '666', '912'])}-{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}"
        raise ValueError(slot)


def fill(template, filler, lang, positive):
    """The text and the byte spans of the values put into it."""
    out = b""
    entities = []
    rest = template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        slot, _, rest = tail.partition("}")
        out += head.encode()
        value = filler.value(slot, lang) if positive else filler.negative(slot)
        start = len(out)
        out += value.encode()
        if positive:
            entities.append({"kind": slot, "start": start, "end": len(out), "value": value})
    out += rest.encode()
    return out.decode(), entities


def main():
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else SEED
    rng = random.Random(seed)
    fakers = {}
    for lang, locale in LOCALES.items():
        f = Faker(locale)
        f.seed_instance(seed + len(fakers))
        fakers[lang] = f
    filler = Filler(rng, fakers)
    rows = []
    for lang in LOCALES:
        templates = TEMPLATES["en" if lang == "gb" else lang]
        for i in range(300 if lang in ("en", "gb") else 180):
            text, entities = fill(templates[i % len(templates)], filler, lang, True)
            rows.append({"lang": lang, "text": text, "entities": entities})
    for i in range(len(NEGATIVES) * 15):
        text, _ = fill(NEGATIVES[i % len(NEGATIVES)], filler, "en", False)
        rows.append({"lang": "neg", "text": text, "entities": []})
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
