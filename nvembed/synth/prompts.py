"""Every prompt the synthetic-data pipelines send, and how they are filled in.

* E5-mistral ([E5] §3.1, App. C): *brainstorm* templates per asymmetric type (a JSON list of task definitions) and
  *generate* templates per type (one JSON example), with placeholders (query length, clarity, difficulty,
  language, ...) sampled by a seeded RNG; :data:`KEYS` are the JSON keys each generate template asks for.
* Gecko FRet ([GK] §3.2): query generation (a JSON ``{task, query}`` per seed passage), query likelihood (QL,
  scored as raw text) and relevance classification (RC, the log-probability of "yes").
"""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

# ---------------------------------------------------------------------------------------------------------------
# E5-mistral
# ---------------------------------------------------------------------------------------------------------------
ASYMMETRIC = ("short-long", "long-short", "short-short", "long-long")
SYMMETRIC = ("sts", "bitext")
TYPES = ASYMMETRIC + SYMMETRIC

# ---------------------------------------------------------------------------------------------------------------
# placeholders ([E5] §3.1 and App. C; values as in the paper's templates)
# ---------------------------------------------------------------------------------------------------------------
QUERY_TYPE = ["extremely long-tail", "long-tail", "common"]
QUERY_LENGTH = ["less than 5 words", "5 to 15 words", "at least 10 words"]
CLARITY = ["clear", "understandable with some effort", "ambiguous"]
NUM_WORDS = [50, 100, 200, 300, 400, 500]
DIFFICULTY = ["high school", "college", "PhD"]
UNIT = ["sentence", "phrase", "passage"]
HIGH_SCORE = ["4", "4.5", "5"]
LOW_SCORE = ["2.5", "3", "3.5"]
# A subset of the XLM-R languages, weighted towards high-resource ones (E5 samples the XLM-R list that way).
XLMR_LANGUAGES = {
    "English": 30, "Russian": 6, "Chinese": 5, "German": 5, "French": 5, "Spanish": 5, "Japanese": 4, "Italian": 3,
    "Portuguese": 3, "Dutch": 2, "Polish": 2, "Korean": 2, "Vietnamese": 2, "Persian": 2, "Turkish": 2,
    "Indonesian": 2, "Arabic": 2, "Swedish": 1, "Czech": 1, "Ukrainian": 1, "Hindi": 1, "Greek": 1, "Romanian": 1,
    "Hungarian": 1, "Danish": 1, "Finnish": 1, "Thai": 1, "Hebrew": 1, "Bengali": 0.5, "Tamil": 0.5, "Urdu": 0.5,
    "Swahili": 0.5, "Telugu": 0.5, "Marathi": 0.5, "Tagalog": 0.5, "Afrikaans": 0.5, "Catalan": 0.5,
    "Estonian": 0.5, "Latvian": 0.5, "Lithuanian": 0.5, "Slovenian": 0.5, "Serbian": 0.5, "Bulgarian": 0.5,
}

# ---------------------------------------------------------------------------------------------------------------
# prompt templates
# ---------------------------------------------------------------------------------------------------------------
_LIST_TAIL = ("Your output must always be a JSON list of strings only, with about {n} elements, and each element "
              "corresponds to a distinct task in one sentence. Do not explain yourself or output anything else. "
              "Be creative!")

BRAINSTORM = {
    "short-long": (
        "Brainstorm a list of potentially useful text retrieval tasks.\n\n"
        "Here are a few examples for your reference:\n"
        "- Provided a scientific claim as query, retrieve documents that help verify or refute the claim.\n"
        "- Search for documents that answer a FAQ-style query on children's nutrition.\n\n"
        "Please adhere to the following guidelines:\n"
        "- Specify what the query is, and what the desired documents are.\n"
        "- Each retrieval task should cover a wide range of queries, and should not be too specific.\n\n"),
    "long-short": (
        "Brainstorm a list of potentially useful text classification tasks.\n\n"
        "Please adhere to the following guidelines:\n"
        "- Tasks should cover a diverse range of domains and task types.\n\n"),
    "short-short": (
        "Brainstorm a list of text matching tasks where both the queries and the groundtruth documents are very "
        "short (one or two sentences, even a short phrase).\n\n"
        "Here are a few examples:\n"
        "- Given a scientific paper title, retrieve the title of papers that cite the given paper.\n"
        "- Match a word with its definition.\n"
        "- Provided a notable person's name, identify their occupation or achievement.\n\n"),
    "long-long": (
        "Brainstorm a list of text matching tasks where the queries are long documents.\n\n"
        "Here are a few examples:\n"
        "- Given a document that supports a debatable argument, find another document that contains opposite "
        "arguments.\n"
        "- Provided a lengthy business proposal, retrieve competitive business strategies in the same industry.\n\n"),
}

GENERATE = {
    "short-long": (
        "You have been assigned a retrieval task: {task}\n"
        "Your mission is to write one text retrieval example for this task in JSON format. The JSON object must "
        "contain the following keys:\n"
        '- "user_query": a string, a random user search query specified by the retrieval task.\n'
        '- "positive_document": a string, a relevant document for the user query.\n'
        '- "hard_negative_document": a string, a hard negative document that only appears relevant to the query.\n\n'
        "Please adhere to the following guidelines:\n"
        '- The "user_query" should be {query_type}, {query_length}, {clarity}, and diverse in topic.\n'
        "- All documents must be created independent of the query. Avoid copying the query verbatim. It's "
        'acceptable if some parts of the "positive_document" are not topically related to the query.\n'
        "- All documents should be at least {num_words} words long.\n"
        '- The "hard_negative_document" contains some useful information, but it should be less useful or '
        'comprehensive compared to the "positive_document".\n'
        "- Both the query and documents should be in {language}.\n"
        "- Do not provide any explanation in any document on why it is relevant or not relevant to the query.\n"
        "- Both the query and documents require {difficulty} level education to understand.\n\n"
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "long-short": (
        "You have been assigned a text classification task: {task}\n"
        "Your mission is to write one text classification example for this task in JSON format. The JSON object "
        "must contain the following keys:\n"
        '- "input_text": a string, the input text specified by the classification task.\n'
        '- "label": a string, the correct label of the input text.\n'
        '- "misleading_label": a string, an incorrect label that is related to the task.\n\n'
        "Please adhere to the following guidelines:\n"
        '- The "input_text" should be at least {num_words} words and diverse in expression.\n'
        '- The "misleading_label" must be a valid label for the given task, but not as appropriate as the "label" '
        'for the "input_text".\n'
        "- The values for all fields should be in {language}.\n"
        "- Avoid including the values of the \"label\" and \"misleading_label\" fields in the \"input_text\", that "
        "would make the task too easy.\n"
        '- The "input_text" is {clarity} and requires {difficulty} level education to comprehend.\n\n'
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "short-short": (
        "You have been assigned a text matching task: {task}\n"
        "Your mission is to write one example for this task in JSON format. The JSON object must contain the "
        "following keys:\n"
        '- "input": a string, a random input specified by the task.\n'
        '- "positive_document": a string, a relevant document for the "input" according to the task.\n'
        '- "hard_negative_document": a string, a document that only appears relevant to the "input".\n\n'
        "Please adhere to the following guidelines:\n"
        "- The values of all fields should be in {language}.\n"
        '- Both the "input" and "positive_document" should be very short (a sentence or a phrase), avoid '
        "substantial word overlaps, otherwise the task would be too easy.\n"
        '- The "input" is {query_length}, {clarity}, and requires {difficulty} level education to comprehend.\n\n'
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "long-long": (
        "You have been assigned a text matching task: {task}\n"
        "Your mission is to write one example for this task in JSON format. The JSON object must contain the "
        "following keys:\n"
        '- "input": a string, a random input specified by the task.\n'
        '- "positive_document": a string, a relevant document for the "input" according to the task.\n'
        '- "hard_negative_document": a string, a document that only appears relevant to the "input".\n\n'
        "Please adhere to the following guidelines:\n"
        "- The values of all fields should be in {language}.\n"
        '- Both the "input" and "positive_document" should be long documents (at least {num_words} words), avoid '
        "substantial word overlaps, otherwise the task would be too easy.\n"
        '- The "input" is {clarity} and requires {difficulty} level education to comprehend.\n\n'
        "Your output must always be a JSON object only, do not explain yourself or output anything else. "
        "Be creative!"),
    "sts": (
        "Write a {unit} triple with varying semantic similarity scores in JSON format. The semantic similarity "
        "score ranges from 1 to 5, with 1 denotes least similar and 5 denotes most similar.\n\n"
        "Please adhere to the following guidelines:\n"
        '- The keys in JSON are "S1", "S2", and "S3", the values are all strings in {language}, do not add any '
        "other keys.\n"
        '- There should be some word overlaps between all three {unit}s.\n'
        '- The similarity score between S1 and S2 should be {high_score}.\n'
        '- The similarity score between S1 and S3 should be {low_score}.\n'
        '- The {unit}s require {difficulty} level education to understand and should be diverse in terms of topic '
        "and length.\n\n"
        "Your output must be a JSON object only with three keys \"S1\", \"S2\" and \"S3\", do not explain yourself "
        "or output anything else. Be creative!"),
    "bitext": (
        "Write a {unit} triple with one {unit} in {src_lang} and two {unit}s in {tgt_lang} in JSON format.\n\n"
        "Please adhere to the following guidelines:\n"
        '- The keys in JSON are "S1", "S2", and "S3", the values are all strings, do not add any other keys.\n'
        '- S1 is in {src_lang}; S2 is its translation in {tgt_lang} (similarity score {high_score} out of 5).\n'
        '- S3 is in {tgt_lang}, shares some words with S2 but is not a translation of S1 (similarity score '
        "{low_score} out of 5).\n"
        "- The {unit}s require {difficulty} level education to understand and should be diverse in topic.\n\n"
        "Your output must be a JSON object only with three keys \"S1\", \"S2\" and \"S3\", do not explain yourself "
        "or output anything else. Be creative!"),
}

# (query key, positive key, negative key) of each type's JSON object
KEYS = {
    "short-long": ("user_query", "positive_document", "hard_negative_document"),
    "long-short": ("input_text", "label", "misleading_label"),
    "short-short": ("input", "positive_document", "hard_negative_document"),
    "long-long": ("input", "positive_document", "hard_negative_document"),
    "sts": ("S1", "S2", "S3"),
    "bitext": ("S1", "S2", "S3"),
}
SYMMETRIC_INSTRUCTIONS = {
    "sts": "Retrieve semantically similar text",
    "bitext": "Retrieve parallel sentences",
}


def language_table(languages: Any) -> Dict[str, float]:
    if languages == "xlmr":
        return dict(XLMR_LANGUAGES)
    if isinstance(languages, str):
        return {languages: 1.0}
    if isinstance(languages, dict):
        return {str(k): float(v) for k, v in languages.items()}
    return {str(k): 1.0 for k in languages}


def sample_placeholders(kind: str, rng: random.Random, languages: Dict[str, float]) -> Dict[str, Any]:
    names, weights = list(languages), list(languages.values())
    p: Dict[str, Any] = {
        "query_type": rng.choice(QUERY_TYPE), "query_length": rng.choice(QUERY_LENGTH),
        "clarity": rng.choice(CLARITY), "num_words": rng.choice(NUM_WORDS), "difficulty": rng.choice(DIFFICULTY),
        "language": rng.choices(names, weights)[0], "unit": rng.choice(UNIT), "high_score": rng.choice(HIGH_SCORE),
        "low_score": rng.choice(LOW_SCORE),
    }
    if kind == "bitext":
        src = rng.choices(names, weights)[0]
        others = [n for n in names if n != src] or ["English" if src != "English" else "French"]
        ow = [languages.get(n, 1.0) for n in others]
        p.update(src_lang=src, tgt_lang=rng.choices(others, ow)[0])
    return p


def brainstorm_prompt(kind: str, n: int) -> str:
    return BRAINSTORM[kind] + _LIST_TAIL.format(n=n)


def example_prompt(kind: str, task: Optional[str], placeholders: Dict[str, Any]) -> str:
    return GENERATE[kind].format(task=task or "", **placeholders)


# ---------------------------------------------------------------------------------------------------------------
# Gecko FRet
# ---------------------------------------------------------------------------------------------------------------
QG_PROMPT = (
    "You read a web passage and write a task description and a search query for which the passage is useful.\n"
    "The task is one sentence that tells what kind of passage should be retrieved for the query. Examples of tasks:\n"
    "- Given a query, find a passage that has the answer to the query\n"
    "- Given a query, find a passage that allows you to check whether the query is true or not\n\n"
    "Example 1\n"
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the world.\n"
    'Output: {{"task": "Given a query, find a passage that has the answer to the query", '
    '"query": "which river carries the most water"}}\n\n'
    "Example 2\n"
    "Passage: Vitamin C was first isolated in 1928 by the Hungarian biochemist Albert Szent-Gyorgyi.\n"
    'Output: {{"task": "Given a query, find a passage that allows you to check whether the query is true or not", '
    '"query": "vitamin C was discovered by a Hungarian scientist"}}\n\n'
    "Now the passage to use:\n"
    "Passage: {passage}\n"
    'Write the output as a JSON object with keys "task" and "query" only; do not copy the passage. Output:')

QL_PROMPT = (
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the world.\n"
    "Query: which river carries the most water\n\n"
    "Passage: {passage}\n"
    "Query:")

RC_PROMPT = (
    "Decide whether the passage is relevant to the query for the task. Answer yes or no.\n\n"
    "Task: Given a query, find a passage that has the answer to the query\n"
    "Query: which river carries the most water\n"
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the world.\n"
    "Relevant: yes\n\n"
    "Task: Given a query, find a passage that has the answer to the query\n"
    "Query: which river carries the most water\n"
    "Passage: Vitamin C was first isolated in 1928 by the Hungarian biochemist Albert Szent-Gyorgyi.\n"
    "Relevant: no\n\n"
    "Task: {task}\n"
    "Query: {query}\n"
    "Passage: {passage}\n"
    "Relevant:")


def query_prompt(passage: str) -> str:
    """FRet step 1: ask for ``{"task", "query"}`` for a seed passage."""
    return QG_PROMPT.format(passage=passage)


def ql_prompt(passage: str) -> str:
    """Query likelihood context: the query is scored as its continuation (``" " + query``)."""
    return QL_PROMPT.format(passage=passage)


def rc_prompt(task: str, query: str, passage: str) -> str:
    """Relevance classification: the label (``yes``) is scored as the answer."""
    return RC_PROMPT.format(task=task, query=query, passage=passage)
