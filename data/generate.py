"""Generate the bundled banking dataset: `python -m data.generate [--seed 0] [--out-dir data]`.

Each row is {"instruction", "response", "intent", "template"}. The response is a function of the
intent and the slots the user gave (account, card, amount, recipient...), never of the phrasing, so
one question always has one answer. Customer-specific and bank-specific figures are placeholders in
square brackets ([SAVINGS_BALANCE], [SUPPORT_PHONE]) that infer.py fills from an account store: the
model never learns to make up a balance. The test split holds out whole phrasing templates.
The same seed writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROWS_PER_INTENT = 110
TEST_TEMPLATE_EVERY = 6  # templates 5, 11, 17... of each intent are seen only in the test split
VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "test")

ACCOUNTS = {  # phrase the user says -> (name in the answer, placeholder stem)
    "checking": ("checking", "CHECKING"),
    "chequing": ("checking", "CHECKING"),
    "current account": ("checking", "CHECKING"),
    "checking account": ("checking", "CHECKING"),
    "savings": ("savings", "SAVINGS"),
    "savings account": ("savings", "SAVINGS"),
    "saving acct": ("savings", "SAVINGS"),
    "credit card": ("credit card", "CREDIT_CARD"),
    "visa card": ("credit card", "CREDIT_CARD"),
    "credit card account": ("credit card", "CREDIT_CARD"),
}
CARDS = {
    "debit card": "debit",
    "credit card": "credit",
    "bank card": "debit",
    "visa": "credit",
    "mastercard": "credit",
    "atm card": "debit",
    "debit": "debit",
    "credit card account": "credit",
}
LOANS = {
    "car loan": "CAR",
    "auto loan": "CAR",
    "vehicle loan": "CAR",
    "personal loan": "PERSONAL",
    "unsecured personal loan": "PERSONAL",
    "student loan": "STUDENT",
    "education loan": "STUDENT",
    "home loan": "HOME",
    "mortgage": "HOME",
    "house loan": "HOME",
}
LOAN_NAMES = {"CAR": "car", "PERSONAL": "personal", "STUDENT": "student", "HOME": "home"}
NAMES = [
    "Mom",
    "Dad",
    "John",
    "Priya",
    "Carlos",
    "Aisha",
    "my landlord",
    "my sister",
    "my brother",
    "Wei Chen",
    "Fatima",
    "Olga",
    "Kofi",
    "Maria Lopez",
    "Sam",
    "Grandma",
    "my roommate",
    "Tom Baker",
    "Yuki",
    "Emma",
    "Ahmed",
    "Lucas",
    "Nina",
    "Ravi Patel",
    "Sofia",
    "my son",
    "my daughter",
    "Jean",
    "Omar",
    "Hannah",
]
CITIES = [
    "Springfield",
    "Austin",
    "Denver",
    "Boston",
    "Seattle",
    "Chicago",
    "Miami",
    "Portland",
    "Phoenix",
    "Atlanta",
    "Dallas",
    "Madison",
    "Raleigh",
    "Tucson",
    "Omaha",
    "Fresno",
    "Tampa",
    "Boise",
]
FEES = {
    "overdraft fee": ("overdraft", "OVERDRAFT_FEE"),
    "overdraft charge": ("overdraft", "OVERDRAFT_FEE"),
    "monthly fee": ("monthly maintenance", "MONTHLY_FEE"),
    "maintenance fee": ("monthly maintenance", "MONTHLY_FEE"),
    "account fee": ("monthly maintenance", "MONTHLY_FEE"),
    "atm fee": ("ATM", "ATM_FEE"),
    "fee for using other atms": ("ATM", "ATM_FEE"),
    "wire transfer fee": ("wire transfer", "WIRE_FEE"),
    "wire fee": ("wire transfer", "WIRE_FEE"),
    "international wire fee": ("wire transfer", "WIRE_FEE"),
}
SECRETS = {
    "pin": "PIN",
    "PIN": "PIN",
    "card pin": "PIN",
    "password": "password",
    "online banking password": "password",
    "login password": "password",
    "app password": "password",
}
OUT_OF_DOMAIN = {  # question -> topic, who to ask instead
    "medical": (
        "a doctor or pharmacist",
        [
            "What should I take for a headache?",
            "is ibuprofen safe with coffee",
            "How do I treat a sprained ankle?",
            "my kid has a fever what do i do",
            "What are the symptoms of the flu?",
            "how much sleep does an adult need",
            "Can you diagnose this rash on my arm?",
            "Is it safe to run with a cold?",
        ],
    ),
    "legal": (
        "a qualified lawyer",
        [
            "How do I sue my neighbour?",
            "can my landlord evict me without notice",
            "How do I write a will?",
            "Is it legal to record a phone call?",
            "what are my rights if I get fired",
            "How do I file for divorce?",
            "Do I need a lawyer for small claims court?",
        ],
    ),
    "cooking": (
        "a recipe site or cookbook",
        [
            "How do I make lasagna?",
            "whats a good recipe for banana bread",
            "How long do I boil an egg?",
            "Give me a vegan curry recipe.",
            "how do you make pancakes fluffy",
            "What wine goes with salmon?",
            "How do I cook rice without a rice cooker?",
        ],
    ),
    "sports": (
        "a sports news site",
        [
            "Who won the football game last night?",
            "whats the score of the lakers game",
            "Who is the best tennis player ever?",
            "When does the world cup start?",
            "How many players are on a cricket team?",
            "give me a fantasy football lineup",
        ],
    ),
    "coding": (
        "a programming forum or documentation",
        [
            "How do I reverse a list in Python?",
            "fix my javascript bug please",
            "What is a null pointer exception?",
            "Write me a SQL query to join two tables.",
            "how do i center a div in css",
            "Explain recursion to me.",
        ],
    ),
    "general knowledge": (
        "a search engine or encyclopedia",
        [
            "What's the weather tomorrow?",
            "What is the capital of Australia?",
            "tell me a joke",
            "Who wrote Pride and Prejudice?",
            "How far away is the moon?",
            "Recommend a good movie for tonight.",
            "Can you book me a flight to Paris?",
            "what time is it in Tokyo",
            "Write a poem about the sea.",
        ],
    ),
}

# Responses: one per intent and slot combination.
SUPPORT = "[SUPPORT_PHONE]"


def respond(intent: str, s: dict) -> str:
    if intent == "lost_stolen_card":
        return (
            f"I'm sorry to hear that. Please block your {s['card']} card right away in the mobile app under Cards, "
            f"then Lock card, or call our card line, open around the clock, at {SUPPORT}. "
            "Once it is blocked we will send you a free "
            "replacement card, and you can report any transactions you don't recognise."
        )
    if intent == "freeze_card":
        if s["action"] == "freeze":
            return (
                f"You can freeze your {s['card']} card instantly in the mobile app under Cards, then Freeze card. "
                "While it is frozen no new purchases or withdrawals go through, and you can unfreeze it at any time."
            )
        return (
            f"To unfreeze your {s['card']} card, open the mobile app, go to Cards and switch off Freeze card. "
            "It works again straight away. If it stays blocked, please call us at " + SUPPORT + "."
        )
    if intent == "card_declined":
        return (
            f"I'm sorry your {s['card']} card was declined. Common reasons are a frozen card, a daily spending "
            "limit, an expired card or a fraud check. Check the Cards section of the app for alerts, or call us at "
            f"{SUPPORT} and we can look into it with you."
        )
    if intent == "check_balance":
        name, stem = s["account"]
        return f"The current balance of your {name} account is [{stem}_BALANCE]."
    if intent == "recent_transactions":
        name, stem = s["account"]
        return (
            f"Here are the most recent transactions on your {name} account: [{stem}_RECENT_TRANSACTIONS]. "
            "If you don't recognise one of them, tell me and I will help you report it."
        )
    if intent == "transfer_funds":
        return (
            f"I can help you send {s['amount_text']} to {s['recipient']}. Before any money moves, please confirm "
            "the recipient's details and approve the transfer with the one-time code we send to your phone."
        )
    if intent == "loan_rates":
        stem = s["loan"]
        return (
            f"Our {LOAN_NAMES[stem]} loan rates currently start at [{stem}_LOAN_RATE] APR. Your exact rate depends "
            "on your credit history, the amount and the term; you can get a personalised quote in the app "
            "without affecting your credit score."
        )
    if intent == "loan_apply":
        return (
            f"You can apply for a {LOAN_NAMES[s['loan']]} loan in the app, online or at any branch. You will need "
            "a photo ID, proof of income and details of your current debts. Eligibility depends on your credit "
            "history and income, and we will tell you our decision before you commit to anything."
        )
    if intent == "branch_hours":
        if s.get("city"):
            return (
                f"To find a branch or ATM near {s['city']}, use the branch locator in the mobile app or on our "
                "website. Most branches are open [BRANCH_HOURS]."
            )
        return (
            "Our branches are open [BRANCH_HOURS]. Hours can differ on public holidays, so please check the "
            "branch locator in the app before you visit."
        )
    if intent == "fees":
        name, stem = s["fee"]
        return (
            f"Our {name} fee is [{stem}]. You can see every fee that applies to your account in the app under "
            "Account details, then Fees."
        )
    if intent == "account_details":
        return (
            "Our routing number is [ROUTING_NUMBER]. Your full account number is in the mobile app under "
            "Account details, and it is also printed on your statements. Never share your PIN or password "
            "with anyone."
        )
    if intent == "open_account":
        return (
            f"You can open a new {s['account'][0]} account online or at any branch in about ten minutes. You will "
            "need a photo ID, your address and your Social Security number, and you can fund it with a transfer "
            "from another bank."
        )
    if intent == "fraud_report":
        return (
            f"Thank you for telling us. Please freeze your card in the app now and call our fraud team at "
            f"{SUPPORT}, available around the clock. "
            "We will review the transactions you don't recognise, and you are not "
            "liable for confirmed fraud. We will never ask for your PIN or password."
        )
    if intent == "reset_pin_password":
        if s["secret"] == "PIN":
            return (
                "You can reset your PIN in the mobile app under Cards, then Change PIN, after confirming your "
                "identity, or at any of our ATMs. We will never ask you for your PIN, password or full card "
                "number, so please don't share them with anyone, including us."
            )
        return (
            "To reset your password, tap Forgot password on the sign-in screen and follow the steps to confirm "
            "your identity. We will never ask you for your PIN, password or full card number, so please don't "
            "share them with anyone, including us."
        )
    if intent == "greeting":
        return (
            "Hello! I'm your banking assistant. I can help with your cards, balances, transfers, loans and "
            "branch information. What can I do for you today?"
        )
    if intent == "thanks_goodbye":
        return "You're welcome! If you need anything else with your banking, I'm here to help. Have a great day."
    if intent == "out_of_domain":
        topic, expert = s["topic"]
        return (
            f"I'm sorry, I can only help with banking questions, such as cards, accounts, transfers and loans. "
            f"For {topic} questions, please ask {expert}."
        )
    raise ValueError(f"unknown intent {intent}")


# Instruction templates per intent. Slots: {card} {account} {amount} {recipient} {loan} {city} {fee}
# {secret} {name}. Each template is one phrasing; the test split holds some out entirely.
TEMPLATES = {
    "lost_stolen_card": [
        "I lost my {card}.",
        "i think my {card} was stolen",
        "Help! Someone stole my {card}!",
        "I can't find my {card} anywhere, what should I do?",
        "lost {card}",
        "My wallet was stolen with my {card} in it.",
        "How do I report a lost {card}?",
        "I left my {card} at a restaurant and now it's gone.",
        "Good afternoon, I would like to report that my {card} has been lost.",
        "my {card} got stolen last night pls help",
        "I need to block my {card} because I lost it.",
        "Can I get a replacement for my lost {card}?",
        "Hi, this is {name}, my {card} was stolen on the train this morning and I'm worried someone will use it.",
        "stolen {card} what now",
        "I dropped my {card} somewhere in town.",
        "How do I cancel a stolen {card}?",
        "Where do I report my {card} as missing?",
        "Urgent: my {card} is missing.",
    ],
    "freeze_card": [
        "How do I {action} my {card}?",
        "Please {action} my {card}.",
        "{action} {card}",
        "Can you help me {action} my {card}?",
        "I want to {action} my {card} for now.",
        "is there a way to {action} my {card} in the app",
        "Hello, I'd like to {action} my {card}, please.",
        "I found my {card}, how do I {action} it?",
        "need to {action} my {card} asap",
        "Could you tell me how to temporarily {action} my {card}?",
        "How can I {action} the {card} I use?",
        "Hi, I'm {name}. I would like to {action} my {card} from the mobile app.",
        "what are the steps to {action} a {card}",
        "I want my {card} to {action}.",
        "Quick question: can I {action} my {card} myself?",
    ],
    "card_declined": [
        "Why was my {card} declined?",
        "my {card} keeps getting declined",
        "{card} declined at the store",
        "My {card} didn't work at the supermarket today.",
        "Why won't my {card} go through?",
        "Payment with my {card} was rejected, why?",
        "I tried to pay online and my {card} was refused.",
        "Hi, I'm {name} and my {card} got declined at a gas station even though I have money.",
        "card declined again?? its my {card}",
        "What does it mean when my {card} is declined?",
        "My {card} isn't working.",
        "The ATM rejected my {card}.",
        "Good morning, my {card} was declined at a hotel.",
        "why does my {card} not work abroad",
        "Transaction denied on my {card}, what happened?",
    ],
    "check_balance": [
        "What is my {account} balance?",
        "How much money is in my {account}?",
        "balance {account}",
        "Can you tell me my {account} balance please?",
        "whats my {account} balance rn",
        "I need to know my remaining balance in my {account}.",
        "Check my {account} balance.",
        "How much do I have left in my {account}?",
        "Show me the balance of my {account}.",
        "Hi, this is {name}. Could you let me know the current balance on my {account}?",
        "what's left in my {account}",
        "Good evening, I would like to check the balance of my {account}.",
        "how much is in {account}",
        "Tell me my {account} balance.",
        "Do I have money in my {account}?",
        "Balance inquiry for my {account}, please.",
        "I'd like to see how much is in my {account}.",
    ],
    "recent_transactions": [
        "Show my recent transactions on my {account}.",
        "What were my last transactions in my {account}?",
        "recent transactions {account}",
        "Can I see my latest {account} activity?",
        "list my last few purchases on my {account}",
        "What did I spend recently on my {account}?",
        "I want to review recent activity on my {account}.",
        "show me my {account} transaction history",
        "Hi, I'm {name}, could you show me the recent payments from my {account}?",
        "What are the latest charges on my {account}?",
        "Pull up my recent {account} transactions please.",
        "last transactions on {account}?",
        "Has anything been taken out of my {account} lately?",
        "Could you list the most recent movements on my {account}?",
        "I'd like a mini statement for my {account}.",
    ],
    "transfer_funds": [
        "Transfer {amount} to {recipient}.",
        "Send {amount} to {recipient}",
        "I want to send {amount} to {recipient}.",
        "Can you move {amount} to {recipient}?",
        "pay {recipient} {amount}",
        "Please transfer {amount} to {recipient} today.",
        "send {recipient} {amount} pls",
        "How do I transfer {amount} to {recipient}?",
        "I need to pay {recipient} {amount} for rent.",
        "Wire {amount} to {recipient}.",
        "Hi, could you help me send {amount} over to {recipient}?",
        "transfer {amount} to {recipient} from checking",
        "I'd like to make a payment of {amount} to {recipient}.",
        "Make a transfer of {amount} to {recipient}, please.",
        "Can I send {amount} to {recipient} right now?",
        "I owe {recipient} {amount}, can you send it?",
    ],
    "loan_rates": [
        "What are your {loan} rates?",
        "What's the interest rate on a {loan}?",
        "{loan} interest rate",
        "How much interest do you charge for a {loan}?",
        "current rates for a {loan}?",
        "Could you tell me the APR on your {loan}?",
        "whats the rate for a {loan} these days",
        "Hi, I'm {name}, I'm shopping around and want to know your {loan} rate.",
        "Is your {loan} rate fixed or variable and how much is it?",
        "How expensive is a {loan} with you?",
        "Tell me the {loan} interest rates.",
        "What rate would I pay on a {loan}?",
        "Good morning, what is the current annual rate for a {loan}?",
        "rate on {loan}?",
    ],
    "loan_apply": [
        "How do I apply for a {loan}?",
        "Do I qualify for a {loan}?",
        "I want to apply for a {loan}.",
        "What do I need to get a {loan}?",
        "{loan} application",
        "Am I eligible for a {loan}?",
        "Can I get a {loan} with you?",
        "how to get a {loan}",
        "What documents do I need for a {loan}?",
        "Hi, this is {name}. I'd like to start an application for a {loan}.",
        "What are the requirements for a {loan}?",
        "i need a {loan} how do i start",
        "Could you explain how to qualify for a {loan}?",
        "Where can I apply for a {loan}?",
        "Good afternoon, I am interested in taking out a {loan}.",
    ],
    "branch_hours": [
        "What are your branch hours?",
        "When is the bank open?",
        "What time does the branch close today?",
        "Are you open on Saturday?",
        "branch hours",
        "Is there a branch near {city}?",
        "Where is the closest branch in {city}?",
        "bank opening hours?",
        "Find a branch in {city}.",
        "What time do you open tomorrow?",
        "Hi, I'm {name}. Is there an ATM or branch close to {city}?",
        "whats the nearest branch to {city}",
        "How late are branches open on weekdays?",
        "Is the branch open on Sundays?",
        "Where can I find a branch around {city}?",
        "When can I visit a branch?",
        "Do you have a location in {city}?",
    ],
    "fees": [
        "What is the {fee}?",
        "How much is the {fee}?",
        "{fee}",
        "Do you charge an {fee}?",
        "Can you tell me about the {fee}?",
        "how much do you charge for the {fee}",
        "Is there a {fee} on my account?",
        "Hi, I'm {name} and I'd like to know the {fee}.",
        "whats ur {fee}",
        "What would the {fee} cost me?",
        "Explain the {fee} please.",
        "Good morning, could you confirm the amount of the {fee}?",
        "why is there a {fee}",
    ],
    "account_details": [
        "What is your routing number?",
        "routing number",
        "Where can I find my account number?",
        "I need the routing number for direct deposit.",
        "What's the bank's routing number?",
        "How do I find my account and routing numbers?",
        "Can you give me the routing number for a wire?",
        "my employer needs my routing number",
        "Hi, I'm {name}, what routing number should I give my employer?",
        "Where is my account number on the app?",
        "What is the ABA routing number?",
        "routing no. please",
        "I need my bank details to set up direct deposit.",
        "Which routing number do I use for {recipient}'s transfer?",
        "Where do I see my full account number?",
        "Please tell me the routing number for my {account}.",
    ],
    "open_account": [
        "How do I open a {account}?",
        "I want to open a new {account}.",
        "open {account}",
        "Can I open a {account} online?",
        "What do I need to open a {account}?",
        "how to open a {account}",
        "Hi, I'm {name} and I'd like to open a {account} with you.",
        "I'd like to start a {account}.",
        "What documents are needed for a new {account}?",
        "Can I open a {account} today?",
        "i wanna open a {account}",
        "Good afternoon, how can I open a {account} for myself?",
        "Is it easy to open a {account}?",
        "Help me open a {account}.",
    ],
    "fraud_report": [
        "I see a transaction I didn't make.",
        "There's a suspicious charge on my account.",
        "I think I've been scammed.",
        "someone used my card without permission",
        "Report fraud",
        "There is a payment of {amount} I don't recognise.",
        "I got a text asking for my PIN, is that you?",
        "My account was hacked!",
        "unauthorized transaction on my card",
        "Hi, I'm {name}. I noticed a charge of {amount} that I never made.",
        "I think someone accessed my account.",
        "Strange purchases showing up on my statement",
        "I was charged {amount} by a shop I've never heard of.",
        "fraud on my account help",
        "A caller claiming to be the bank asked for my password.",
        "How do I dispute a fraudulent charge?",
        "Good evening, I believe my card details were stolen online.",
    ],
    "reset_pin_password": [
        "I forgot my {secret}.",
        "How do I reset my {secret}?",
        "reset {secret}",
        "Can you change my {secret}?",
        "I need a new {secret}.",
        "i forgot my {secret} what do i do",
        "How can I change my {secret}?",
        "Hi, I'm {name} and I'm locked out because I forgot my {secret}.",
        "Please reset my {secret}.",
        "My {secret} isn't working.",
        "Good morning, I would like to update my {secret}.",
        "forgot {secret} help",
        "Can I set a new {secret} in the app?",
        "What's the process to recover my {secret}?",
    ],
    "greeting": [
        "Hi",
        "Hello",
        "Hey there",
        "Good morning",
        "Good afternoon",
        "Good evening",
        "Hi, I'm {name}",
        "hello?",
        "Hey, is anyone there?",
        "Hi there, I have a question",
        "Greetings",
        "yo",
        "Hello, my name is {name}.",
        "hey bank bot",
        "Hi assistant",
    ],
    "thanks_goodbye": [
        "Thank you!",
        "Thanks",
        "thx",
        "Thanks for your help.",
        "That's all, goodbye.",
        "Bye",
        "Thank you so much, {name} here signing off.",
        "great, thanks",
        "Cheers!",
        "Thanks a lot, that helped.",
        "ok thank you bye",
        "Appreciate it.",
        "Many thanks for the quick answer.",
        "Goodbye and thanks.",
        "perfect thank u",
    ],
    "out_of_domain": [question for _, questions in OUT_OF_DOMAIN.values() for question in questions],
}
QUESTION_TOPIC = {
    question: (topic, expert) for topic, (expert, questions) in OUT_OF_DOMAIN.items() for question in questions
}

GREETING_TAILS = ["", " there", "!", ".", ", good day", ", hope you're well", " :)", ", quick one", "!!", " friend"]


def typo(text: str, rng: random.Random) -> str:
    """Swap two neighbouring letters inside one word, as fast typists do."""
    spots = [i for i in range(1, len(text) - 1) if text[i].isalpha() and text[i + 1].isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def amount(rng: random.Random) -> tuple[str, str]:
    """An amount as a user writes it, and as the answer echoes it."""
    value = rng.choice(
        [
            20,
            25,
            40,
            50,
            75,
            100,
            120,
            150,
            200,
            250,
            300,
            350,
            400,
            500,
            600,
            750,
            800,
            1000,
            1200,
            1500,
            2000,
            2500,
            3000,
            5000,
        ]
    )
    cents = rng.random() < 0.15
    number = f"{value:,}.{rng.randint(1, 99):02d}" if cents else f"{value:,}"
    written = rng.choice([f"${number}", f"${number}", number, f"{number} dollars", f"USD {number}"])
    return written, f"${number}"


def fill(intent: str, template: str, rng: random.Random) -> tuple[str, dict]:
    """One instruction from a template, and the slots its answer depends on."""
    slots, values = {}, {}
    if "{card}" in template:
        phrase = rng.choice(sorted(CARDS))
        values["card"], slots["card"] = phrase, CARDS[phrase]
    if "{account}" in template:
        phrase = rng.choice(sorted(ACCOUNTS))
        if intent == "open_account":
            phrase = rng.choice(["checking account", "savings account", "checking", "savings", "current account"])
        values["account"], slots["account"] = phrase, ACCOUNTS[phrase]
    if "{amount}" in template:
        values["amount"], slots["amount_text"] = amount(rng)
    if "{recipient}" in template:
        values["recipient"] = slots["recipient"] = rng.choice(NAMES)
    if "{loan}" in template:
        phrase = rng.choice(sorted(LOANS))
        values["loan"], slots["loan"] = phrase, LOANS[phrase]
    if "{city}" in template:
        values["city"] = slots["city"] = rng.choice(CITIES)
    if "{fee}" in template:
        phrase = rng.choice(sorted(FEES))
        values["fee"], slots["fee"] = phrase, FEES[phrase]
    if "{secret}" in template:
        phrase = rng.choice(sorted(SECRETS))
        values["secret"], slots["secret"] = phrase, SECRETS[phrase]
    if "{name}" in template:
        values["name"] = rng.choice([n for n in NAMES if not n.startswith("my ")])
    if "{action}" in template:
        values["action"] = slots["action"] = rng.choice(["freeze", "unfreeze", "lock", "unlock"])
        slots["action"] = "unfreeze" if values["action"] in ("unfreeze", "unlock") else "freeze"
    if intent == "out_of_domain":
        slots["topic"] = QUESTION_TOPIC[template]
    text = template.format(**values)
    if intent == "greeting":
        text += rng.choice(GREETING_TAILS)
    return style(text, rng), slots


def style(text: str, rng: random.Random) -> str:
    """Vary the surface: some users type in lower case, drop the full stop, make typos or add context."""
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.25:
        text = text.rstrip(".!?")
    if rng.random() < 0.12:
        text = typo(text, rng)
    if rng.random() < 0.08:
        text = rng.choice(["Hello, ", "Hi! ", "Excuse me, ", "Quick question. "]) + text[:1].lower() + text[1:]
    return re.sub(r"\s+", " ", text).strip()


def generate(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for intent, templates in TEMPLATES.items():
        made, attempts = 0, 0
        while made < ROWS_PER_INTENT:
            attempts += 1
            if attempts > 50 * ROWS_PER_INTENT:
                raise RuntimeError(f"intent {intent}: too few distinct phrasings for {ROWS_PER_INTENT} rows")
            index = attempts % len(templates)
            instruction, slots = fill(intent, templates[index], rng)
            if instruction.lower() in seen:
                continue
            seen.add(instruction.lower())
            made += 1
            template_id = f"{intent}/{index}"
            held_out = index % TEST_TEMPLATE_EVERY == TEST_TEMPLATE_EVERY - 1
            split = "test" if held_out else ("validation" if rng.random() < VALIDATION_FRACTION else "train")
            splits[split].append(
                {
                    "instruction": instruction,
                    "response": respond(intent, slots),
                    "intent": intent,
                    "template": template_id,
                }
            )
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0, the bundled files)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).parent, help="where to write banking_<split>.jsonl"
    )
    args = parser.parse_args(argv)
    splits = generate(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(args.out_dir / f"banking_{name}.jsonl", rows)
        print(f"{name}: {len(rows)} rows -> {args.out_dir / f'banking_{name}.jsonl'}")


if __name__ == "__main__":
    main()
