"""
A self-made text-to-SQL data set for the runs of docs/own-data.md: each prompt is a database
schema and a question, each answer the SQL query. Long prompts (the schema) and short, templated
answers that copy names from the prompt, like the text-to-SQL sets users bring.

    python scripts/make_sql.py --out=sql.jsonl --num=3000
    python data/custom/prepare.py --input=sql.jsonl --name=sql --metric=exact
"""

import json
import random
import sys

TABLES = {
    "employees": ["id", "name", "department", "salary", "age", "city", "hired_year"],
    "customers": ["id", "name", "country", "city", "age", "signup_year", "vip"],
    "orders": ["id", "customer_id", "product", "quantity", "price", "order_year", "status"],
    "products": ["id", "name", "category", "price", "stock", "supplier"],
    "students": ["id", "name", "grade", "school", "age", "score", "city"],
    "flights": ["id", "origin", "destination", "airline", "duration", "price", "year"],
    "books": ["id", "title", "author", "genre", "pages", "year", "publisher"],
    "movies": ["id", "title", "director", "genre", "rating", "year", "minutes"],
}
NUMERIC = {"salary", "age", "hired_year", "signup_year", "quantity", "price", "order_year", "stock",
           "grade", "score", "duration", "year", "pages", "rating", "minutes", "customer_id"}
VALUES = {"department": ["Sales", "Research", "Support", "Finance"], "city": ["Oslo", "Lima", "Pune", "Austin"],
          "country": ["Peru", "Norway", "India", "Kenya"], "product": ["lamp", "desk", "chair", "kettle"],
          "status": ["shipped", "pending", "returned"], "category": ["toys", "tools", "garden"],
          "supplier": ["Acme", "Globex", "Initech"], "school": ["North", "Central", "Lakeside"],
          "origin": ["Oslo", "Lima", "Pune"], "destination": ["Austin", "Oslo", "Lima"],
          "airline": ["Nordair", "Andes", "Skyway"], "author": ["Ibsen", "Vargas", "Tagore"],
          "genre": ["drama", "poetry", "comedy"], "publisher": ["Penguin", "Norton"],
          "director": ["Kurosawa", "Varda", "Ray"], "vip": ["yes", "no"], "name": ["Ada", "Luis", "Mei"],
          "title": ["Ghosts", "Gitanjali", "Ikiru"]}


def value(r, column):
    if column in NUMERIC:
        return str(r.randint(1, 2000) if "year" not in column else r.randint(1990, 2024))
    return f"'{r.choice(VALUES.get(column, ['x']))}'"


def condition(r, columns):
    """A WHERE condition on one column: (SQL, the same in words)."""
    column = r.choice([c for c in columns if c != "id"])
    op = r.choice([">", "<", "="]) if column in NUMERIC else "="
    v = value(r, column)
    words = {">": "is greater than", "<": "is less than", "=": "is"}[op]
    return f"{column} {op} {v}", f"{column} {words} {v}"


def question(r, schema):
    """(question, SQL) about one table of the schema."""
    table = r.choice(list(schema))
    columns = schema[table]
    kind = r.randrange(5)
    col = r.choice([c for c in columns if c != "id"])
    cond_sql, cond_text = condition(r, columns)
    if kind == 0:
        return f"List the {col} of every row of {table} where {cond_text}.", f"SELECT {col} FROM {table} WHERE {cond_sql};"
    if kind == 1:
        return f"How many rows of {table} have {cond_text}?", f"SELECT COUNT(*) FROM {table} WHERE {cond_sql};"
    num = r.choice([c for c in columns if c in NUMERIC] or [col])
    if kind == 2:
        agg = r.choice(["AVG", "MAX", "MIN", "SUM"])
        word = {"AVG": "average", "MAX": "largest", "MIN": "smallest", "SUM": "total"}[agg]
        return f"What is the {word} {num} in {table}?", f"SELECT {agg}({num}) FROM {table};"
    if kind == 3:
        order = r.choice(["ASC", "DESC"])
        k = r.randint(1, 10)
        return (f"Show the {col} of the {k} rows of {table} with the {'highest' if order == 'DESC' else 'lowest'} {num}.",
                f"SELECT {col} FROM {table} ORDER BY {num} {order} LIMIT {k};")
    return (f"For each {col} in {table}, count the rows.",
            f"SELECT {col}, COUNT(*) FROM {table} GROUP BY {col};")


def record(r):
    names = r.sample(list(TABLES), r.randint(2, 4))
    schema = {t: TABLES[t] if r.random() < 0.5 else TABLES[t][:r.randint(4, len(TABLES[t]))] for t in names}
    text = "\n".join(f"CREATE TABLE {t} ({', '.join(c + (' INT' if c in NUMERIC else ' TEXT') for c in cols)});"
                     for t, cols in schema.items())
    q, sql = question(r, schema)
    return {"prompt": f"{text}\n-- {q}\n", "answer": sql}


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    r = random.Random(int(args.get("seed", 0)))
    with open(args.get("out", "sql.jsonl"), "w") as f:
        for _ in range(int(args.get("num", 3000))):
            f.write(json.dumps(record(r)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
