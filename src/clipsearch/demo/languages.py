"""The demo sample's vocabulary in English, French, German, Spanish and Chinese (word lists written by hand).

`phrase(lang, kind, color, shape, background, rng)` renders one caption that names the attributes of `kind`:
`cs` colour+shape, `csb` colour+shape+background, `c` colour, `s` shape, `b` background, `sb` shape+background.
`canonical(lang, color, shape)` is the evaluation's colour+shape query ("a red circle", "un cercle rouge",
"ein roter Kreis", "un círculo rojo", "一个红色的圆形"). Adjectives agree with the noun's gender (French,
Spanish) and take the indefinite article's strong or mixed ending (German). The tiny multilingual encoder
(scripts/train_tiny_multilingual.py) is distilled on these captions; the templates listed in `HELD_OUT` are
never used in training, only to measure how the encoder takes phrasings it has not seen.
"""

from __future__ import annotations

import numpy as np

LANGUAGES = ("en", "fr", "de", "es", "zh")
KINDS = ("csb", "cs", "c", "s", "b", "sb")

# ---------------------------------------------------------------------------------------------- English
EN_COLOR = {c: c for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")}
EN_SHAPE = {s: s for s in ("circle", "square", "triangle", "star", "cross", "heart")}
EN_BG = {
    "grass": ["on grass", "on the grass", "on green grass"],
    "sand": ["on sand", "on the sand", "on a sandy beach"],
    "water": ["on water", "on the water", "floating on water"],
    "wood": ["on wood", "on a wooden table", "on wooden boards"],
    "brick": ["on a brick wall", "on bricks", "against a brick wall"],
    "sky": ["in the sky", "against a blue sky", "in the sky with clouds"],
    "snow": ["on snow", "in the snow", "on white snow"],
}

# ----------------------------------------------------------------------------------------------- French
# (masculine, feminine)
FR_COLOR = {
    "red": ("rouge", "rouge"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"),
    "purple": ("violet", "violette"),
    "orange": ("orange", "orange"),
    "white": ("blanc", "blanche"),
    "black": ("noir", "noire"),
}
# (noun, feminine?)
FR_SHAPE = {
    "circle": ("cercle", False),
    "square": ("carré", False),
    "triangle": ("triangle", False),
    "star": ("étoile", True),
    "cross": ("croix", True),
    "heart": ("cœur", False),
}
FR_BG = {
    "grass": ["sur l'herbe", "sur la pelouse", "sur de l'herbe verte"],
    "sand": ["sur le sable", "sur une plage de sable", "sur du sable"],
    "water": ["sur l'eau", "flottant sur l'eau", "sur de l'eau"],
    "wood": ["sur du bois", "sur une table en bois", "sur des planches en bois"],
    "brick": ["sur un mur de briques", "contre un mur de briques", "sur des briques"],
    "sky": ["dans le ciel", "dans un ciel bleu", "dans le ciel avec des nuages"],
    "snow": ["sur la neige", "dans la neige", "sur de la neige blanche"],
}
FR_BG_NOUN = {
    "grass": "herbe",
    "sand": "sable",
    "water": "eau",
    "wood": "bois",
    "brick": "briques",
    "sky": "ciel",
    "snow": "neige",
}

# ----------------------------------------------------------------------------------------------- German
DE_COLOR = {
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "purple": "lila",  # not declined
    "orange": "orange",  # not declined
    "white": "weiß",
    "black": "schwarz",
}
DE_INVARIABLE = {"lila", "orange"}
# (noun, gender m|n|f)
DE_SHAPE = {
    "circle": ("Kreis", "m"),
    "square": ("Quadrat", "n"),
    "triangle": ("Dreieck", "n"),
    "star": ("Stern", "m"),
    "cross": ("Kreuz", "n"),
    "heart": ("Herz", "n"),
}
DE_BG = {
    "grass": ["auf Gras", "auf dem Rasen", "auf grünem Gras"],
    "sand": ["auf Sand", "auf dem Sand", "an einem Sandstrand"],
    "water": ["auf Wasser", "auf dem Wasser", "auf dem Wasser schwimmend"],
    "wood": ["auf Holz", "auf einem Holztisch", "auf Holzbrettern"],
    "brick": ["an einer Ziegelwand", "auf Ziegeln", "vor einer Backsteinmauer"],
    "sky": ["am Himmel", "vor blauem Himmel", "am Himmel mit Wolken"],
    "snow": ["auf Schnee", "im Schnee", "auf weißem Schnee"],
}
DE_BG_NOUN = {
    "grass": "Gras",
    "sand": "Sand",
    "water": "Wasser",
    "wood": "Holz",
    "brick": "Ziegelwand",
    "sky": "Himmel",
    "snow": "Schnee",
}
DE_SOMETHING = {
    "red": "etwas Rotes",
    "green": "etwas Grünes",
    "blue": "etwas Blaues",
    "yellow": "etwas Gelbes",
    "purple": "etwas Lilafarbenes",
    "orange": "etwas Orangefarbenes",
    "white": "etwas Weißes",
    "black": "etwas Schwarzes",
}

# ---------------------------------------------------------------------------------------------- Spanish
ES_COLOR = {
    "red": ("rojo", "roja"),
    "green": ("verde", "verde"),
    "blue": ("azul", "azul"),
    "yellow": ("amarillo", "amarilla"),
    "purple": ("morado", "morada"),
    "orange": ("naranja", "naranja"),
    "white": ("blanco", "blanca"),
    "black": ("negro", "negra"),
}
ES_SHAPE = {
    "circle": ("círculo", False),
    "square": ("cuadrado", False),
    "triangle": ("triángulo", False),
    "star": ("estrella", True),
    "cross": ("cruz", True),
    "heart": ("corazón", False),
}
ES_BG = {
    "grass": ["sobre la hierba", "en el césped", "sobre hierba verde"],
    "sand": ["sobre la arena", "en una playa de arena", "sobre arena"],
    "water": ["sobre el agua", "flotando en el agua", "en el agua"],
    "wood": ["sobre madera", "sobre una mesa de madera", "sobre tablas de madera"],
    "brick": ["en una pared de ladrillos", "contra una pared de ladrillos", "sobre ladrillos"],
    "sky": ["en el cielo", "en un cielo azul", "en el cielo con nubes"],
    "snow": ["sobre la nieve", "en la nieve", "sobre nieve blanca"],
}
ES_BG_NOUN = {
    "grass": "hierba",
    "sand": "arena",
    "water": "agua",
    "wood": "madera",
    "brick": "ladrillos",
    "sky": "cielo",
    "snow": "nieve",
}

# ---------------------------------------------------------------------------------------------- Chinese
ZH_COLOR = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
    "white": "白色",
    "black": "黑色",
}
ZH_SHAPE = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "星形",
    "cross": "十字形",
    "heart": "心形",
}
ZH_BG = {
    "grass": ["在草地上", "在草坪上", "在绿草上"],
    "sand": ["在沙子上", "在沙滩上", "在沙地上"],
    "water": ["在水面上", "在水上", "漂在水上"],
    "wood": ["在木头上", "在木桌上", "在木板上"],
    "brick": ["在砖墙上", "在砖墙前", "在砖头上"],
    "sky": ["在天空中", "在蓝天上", "在有云的天空中"],
    "snow": ["在雪地上", "在雪里", "在白雪上"],
}
ZH_BG_NOUN = {
    "grass": "草地",
    "sand": "沙滩",
    "water": "水面",
    "wood": "木头",
    "brick": "砖墙",
    "sky": "天空",
    "snow": "雪地",
}


# --------------------------------------------------------------------------------------------- phrases
def _fr(color: str, shape: str) -> tuple[str, str, str]:
    noun, fem = FR_SHAPE[shape]
    return ("une" if fem else "un"), noun, FR_COLOR[color][1 if fem else 0]


def _de(color: str, shape: str, case: str = "nom") -> tuple[str, str]:
    """(article + adjective, noun) for 'a <color> <shape>' in the nominative or dative."""
    noun, g = DE_SHAPE[shape]
    adj = DE_COLOR[color]
    inv = adj in DE_INVARIABLE
    if case == "dat":
        art = "einer" if g == "f" else "einem"
        return f"{art} {adj if inv else adj + 'en'}", ("Herzen" if noun == "Herz" else noun)
    art = "eine" if g == "f" else "ein"
    end = "" if inv else {"m": "er", "n": "es", "f": "e"}[g]
    return f"{art} {adj}{end}", noun


def _de_bare(color: str, shape: str) -> str:
    noun, g = DE_SHAPE[shape]
    adj = DE_COLOR[color]
    end = "" if adj in DE_INVARIABLE else {"m": "er", "n": "es", "f": "e"}[g]
    return f"{adj}{end} {noun}"


def _de_def(color: str, shape: str) -> str:
    noun, g = DE_SHAPE[shape]
    adj = DE_COLOR[color]
    art = {"m": "der", "n": "das", "f": "die"}[g]
    return f"{art} {adj if adj in DE_INVARIABLE else adj + 'e'} {noun}"


def _es(color: str, shape: str) -> tuple[str, str, str]:
    noun, fem = ES_SHAPE[shape]
    return ("una" if fem else "un"), noun, ES_COLOR[color][1 if fem else 0]


def templates(lang: str, kind: str, color: str, shape: str, bg: str) -> list[str]:
    """Every phrasing of one meaning in one language (backgrounds: each of their phrases)."""
    if lang == "en":
        a = "an" if color[0] in "aeiou" else "a"
        cs = {
            "cs": [f"{a} {color} {shape}", f"{color} {shape}", f"a photo of {a} {color} {shape}",
                   f"a picture of {a} {color} {shape}", f"the {color} {shape}", f"{a} {color} {shape} shape"],
            "c": [color, f"something {color}", f"{a} {color} object", f"a photo of something {color}"],
            "s": [shape, f"a {shape}", f"a photo of a {shape}", f"a {shape} shape"],
        }  # fmt: skip
        if kind in cs:
            return cs[kind]
        if kind == "csb":
            return [
                t
                for p in EN_BG[bg]
                for t in (
                    f"{a} {color} {shape} {p}",
                    f"a photo of {a} {color} {shape} {p}",
                    f"{color} {shape} {p}",
                )
            ]
        if kind == "sb":
            return [f"a {shape} {p}" for p in EN_BG[bg]]
        return [bg, f"a photo of {bg}"] + [f"something {p}" for p in EN_BG[bg]]
    if lang == "fr":
        art, noun, adj = _fr(color, shape)
        d = "d'une" if art == "une" else "d'un"
        cs = {
            "cs": [f"{art} {noun} {adj}", f"{noun} {adj}", f"une photo {d} {noun} {adj}",
                   f"une image {d} {noun} {adj}", f"le {noun} {adj}" if art == "un" else f"la {noun} {adj}", f"{art} forme de {noun} {adj}"],
            "c": [FR_COLOR[color][0], f"quelque chose de {FR_COLOR[color][0]}", f"un objet {FR_COLOR[color][0]}", f"une photo de quelque chose de {FR_COLOR[color][0]}"],
            "s": [noun, f"{art} {noun}", f"une photo {d} {noun}", f"une forme de {noun}"],
        }  # fmt: skip
        if kind in cs:
            return cs[kind]
        if kind == "csb":
            return [
                t
                for p in FR_BG[bg]
                for t in (f"{art} {noun} {adj} {p}", f"une photo {d} {noun} {adj} {p}", f"{noun} {adj} {p}")
            ]
        if kind == "sb":
            return [f"{art} {noun} {p}" for p in FR_BG[bg]]
        return [FR_BG_NOUN[bg], f"une photo de {FR_BG_NOUN[bg]}"] + [f"quelque chose {p}" for p in FR_BG[bg]]
    if lang == "de":
        nom, noun = _de(color, shape)
        dat, dnoun = _de(color, shape, "dat")
        art = "eine" if DE_SHAPE[shape][1] == "f" else "ein"
        cs = {
            "cs": [f"{nom} {noun}", _de_bare(color, shape), f"ein Foto von {dat} {dnoun}",
                   f"ein Bild von {dat} {dnoun}", _de_def(color, shape), f"{nom} {noun} als Form"],
            "c": [DE_COLOR[color], DE_SOMETHING[color], f"ein {DE_COLOR[color]}{'' if DE_COLOR[color] in DE_INVARIABLE else 'es'} Objekt", f"ein Foto von {DE_SOMETHING[color]}"],
            "s": [noun, f"{art} {noun}", f"ein Foto von {'einer' if art == 'eine' else 'einem'} {_de(color, shape, 'dat')[1]}", f"{art} {noun} als Form"],
        }  # fmt: skip
        if kind in cs:
            return cs[kind]
        if kind == "csb":
            dnoun = _de(color, shape, "dat")[1]
            return [
                t
                for p in DE_BG[bg]
                for t in (
                    f"{nom} {noun} {p}",
                    f"ein Foto von {dat} {dnoun} {p}",
                    f"{_de_bare(color, shape)} {p}",
                )
            ]
        if kind == "sb":
            return [f"{art} {noun} {p}" for p in DE_BG[bg]]
        return [DE_BG_NOUN[bg], f"ein Foto von {DE_BG_NOUN[bg]}"] + [f"etwas {p}" for p in DE_BG[bg]]
    if lang == "es":
        art, noun, adj = _es(color, shape)
        de = f"de {art}"
        cs = {
            "cs": [f"{art} {noun} {adj}", f"{noun} {adj}", f"una foto {de} {noun} {adj}",
                   f"una imagen {de} {noun} {adj}", f"el {noun} {adj}" if art == "un" else f"la {noun} {adj}", f"{art} forma de {noun} {ES_COLOR[color][1]}"],
            "c": [ES_COLOR[color][0], f"algo {ES_COLOR[color][0]}", f"un objeto {ES_COLOR[color][0]}", f"una foto de algo {ES_COLOR[color][0]}"],
            "s": [noun, f"{art} {noun}", f"una foto {de} {noun}", f"una forma de {noun}"],
        }  # fmt: skip
        if kind in cs:
            return cs[kind]
        if kind == "csb":
            return [
                t
                for p in ES_BG[bg]
                for t in (f"{art} {noun} {adj} {p}", f"una foto {de} {noun} {adj} {p}", f"{noun} {adj} {p}")
            ]
        if kind == "sb":
            return [f"{art} {noun} {p}" for p in ES_BG[bg]]
        return [ES_BG_NOUN[bg], f"una foto de {ES_BG_NOUN[bg]}"] + [f"algo {p}" for p in ES_BG[bg]]
    if lang == "zh":
        c, s = ZH_COLOR[color], ZH_SHAPE[shape]
        cs = {
            "cs": [
                f"一个{c}的{s}",
                f"{c}{s}",
                f"一张{c}{s}的照片",
                f"{c}的{s}的图片",
                f"这个{c}的{s}",
                f"{c}的{s}",
            ],
            "c": [c, f"{c}的东西", f"一个{c}的物体", f"一张{c}东西的照片"],
            "s": [s, f"一个{s}", f"一张{s}的照片", f"{s}的形状"],
        }
        if kind in cs:
            return cs[kind]
        if kind == "csb":
            return [t for p in ZH_BG[bg] for t in (f"{p}的一个{c}{s}", f"一个{c}的{s}{p}", f"{c}{s}{p}")]
        if kind == "sb":
            return [f"{p}的一个{s}" for p in ZH_BG[bg]]
        return [ZH_BG_NOUN[bg], f"一张{ZH_BG_NOUN[bg]}的照片"] + [f"{p}的东西" for p in ZH_BG[bg]]
    raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(LANGUAGES)}")


#: (kind, template position) pairs kept out of training: "a picture of a red circle" and its translations
HELD_OUT = {("cs", 3)}


def phrase(
    lang: str, kind: str, color: str, shape: str, bg: str, rng: np.random.Generator, train: bool = True
) -> str:
    opts = templates(lang, kind, color, shape, bg)
    idx = [i for i in range(len(opts)) if not (train and (kind, i) in HELD_OUT)]
    return opts[int(rng.choice(idx))]


def canonical(lang: str, color: str, shape: str) -> str:
    """The colour+shape query of the evaluation: 'a red circle' in each language."""
    return templates(lang, "cs", color, shape, "grass")[0]


def held_out(lang: str, color: str, shape: str) -> str:
    """A colour+shape phrasing the encoder never saw in training ('a picture of a red circle')."""
    return templates(lang, "cs", color, shape, "grass")[3]
