"""Reading the TinyStories text: split into stories, hold out a validation tail.

The text files put a blank line between paragraphs of one story and a single
newline between stories, so a story ends wherever two non-empty lines touch.
"""

import os


def data_dir():
    """Return the folder of the TinyStories text, from UNMASKD_DATA or beside the checkout."""
    base = os.environ.get("UNMASKD_DATA")
    if not base:
        here = os.path.dirname(os.path.abspath(__file__))
        base = os.path.join(here, "..", "..", "shared", "data")
    return os.path.join(base, "tinystories-head")


def read_stories(path):
    """Split a TinyStories text file into a list of stories (paragraphs joined by blank lines)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    stories, current, prev_blank = [], [], True
    for line in lines:
        if line.strip() == "":
            prev_blank = True
            continue
        if not prev_blank and current:
            stories.append("\n\n".join(current))
            current = []
        current.append(line.strip())
        prev_blank = False
    if current:
        stories.append("\n\n".join(current))
    return stories


def split_stories(stories, holdout=0.05):
    """Split stories into (train, validation); the last `holdout` fraction is validation."""
    n_val = max(1, int(len(stories) * holdout))
    return stories[:-n_val], stories[-n_val:]


def held_out(model_dir):
    """Return the held-out token stream, stories and tokenizer, as train.py splits them.

    Returns three Nones when the TinyStories text is not in data_dir().
    """
    import train
    import um_tokenizer

    text = os.path.join(data_dir(), "tinystories_train_head_lowercase.txt")
    if not os.path.exists(text):
        return None, None, None
    _, val_s = split_stories(read_stories(text))
    tok = um_tokenizer.load(os.path.join(model_dir, "tokenizer.json"))
    val, _ = train.encode_stories(tok, val_s, tok.added["<|endoftext|>"])
    return val, val_s, tok
