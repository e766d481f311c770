"""Text knowledge probes: easy four-option questions that measure what the language model knows *before* training.

The probes are the testbed's "general text" knowledge: a model fine-tuned on a downstream task should keep
answering them as well as the base model did. There are four categories of roughly equal size:

- ``world``: capitals, landmarks' countries, continents, languages, currencies, basic history and geography;
- ``science``: everyday science (water, planets, animals, the body, plants, weather, materials, simple physics);
- ``arithmetic``: one- and two-digit ``+``, ``-`` and ``×`` with small results, generated from a fixed seed, with
  wrong answers close to the right one;
- ``words``: opposites, synonyms, young animals, plurals and what a word means.

Each probe is ``{"id", "question", "answer", "options", "category"}``: a chat question and four distinct options
of the same kind, one of them the answer. A probe is scored as multiple choice: each option is rendered as the
assistant's answer to the question with the model's chat template; its score is the sum of the log-probs of the
tokens :class:`forgetless.stats.data.Encoder` labels (the option and the end-of-turn token after it); the
prediction is the option with the highest score (:func:`option_scores`).

Two choices of format make that score measure knowledge rather than style, for a 135M chat model that otherwise
answers in full sentences ("The capital of Japan is Tokyo."), so that a bare "Tokyo" and the end of turn right
after it are unlikely whatever the option:

- text questions end with how long the answer is: "Answer in one or two words." when no option is longer, else
  "Answer in a few words." (on the three text categories the base model scores about 48% with bare questions,
  62% with this);
- arithmetic options are the equation the model writes itself, ``7 + 5 = 12``: all options share the ``7 + 5 =``
  prefix, so only the number separates them (bare numbers: 35%, barely above chance).

The *content* of the probes (questions, answers, options, ids) is fixed; ``seed`` only shuffles the order of each
probe's options and of the list, so scores and accuracies do not depend on it. Probes were not selected by whether
the model answers them (that would bias the forgetting measurement); a few were reworded only where a distractor
could be argued to be right.

The probes are never trained on, so :func:`split_probes` gives an empty ``train`` split: ``val`` (60 probes, for
choosing hyper-parameters) and ``test`` (the rest), stratified by category.

Accuracy of the embedded SmolLM2-135M-Instruct before any training, all probes (chance is 25%)::

    category    accuracy  probes
    world         64.7%      102
    science       55.4%       92
    arithmetic    74.0%       96   (+ 23/32, - 18/32, × 30/32)
    words         66.3%       95
    overall       65.2%      385

measured on CPU with ``OMP_NUM_THREADS=1 python -m forgetless.testbed.probes`` (:func:`probe_accuracy`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError

CATEGORIES = ("world", "science", "arithmetic", "words")
N_OPTIONS = 4
N_VAL = 60
SHORT_ANSWER = "Answer in one or two words."
PHRASE_ANSWER = "Answer in a few words."
ARITHMETIC_SEED = 20240607  # fixes the generated arithmetic questions; independent of the shuffling seed

# (question, answer, three wrong options of the same kind)
Fact = tuple[str, str, str, str, str]

WORLD: list[Fact] = [
    # capitals
    ("What is the capital of France?", "Paris", "Lyon", "Marseille", "Nice"),
    ("What is the capital of Germany?", "Berlin", "Munich", "Hamburg", "Frankfurt"),
    ("What is the capital of Italy?", "Rome", "Milan", "Venice", "Naples"),
    ("What is the capital of Spain?", "Madrid", "Barcelona", "Seville", "Valencia"),
    ("What is the capital of the United Kingdom?", "London", "Manchester", "Liverpool", "Birmingham"),
    ("What is the capital of Japan?", "Tokyo", "Osaka", "Kyoto", "Hiroshima"),
    ("What is the capital of China?", "Beijing", "Shanghai", "Hong Kong", "Guangzhou"),
    ("What is the capital of Russia?", "Moscow", "Saint Petersburg", "Kazan", "Novosibirsk"),
    ("What is the capital of Egypt?", "Cairo", "Alexandria", "Luxor", "Giza"),
    ("What is the capital of Canada?", "Ottawa", "Toronto", "Vancouver", "Montreal"),
    ("What is the capital of Australia?", "Canberra", "Sydney", "Melbourne", "Perth"),
    ("What is the capital of the United States?", "Washington, D.C.", "New York", "Los Angeles", "Chicago"),
    ("What is the capital of India?", "New Delhi", "Mumbai", "Bangalore", "Chennai"),
    ("What is the capital of Mexico?", "Mexico City", "Cancun", "Guadalajara", "Monterrey"),
    ("What is the capital of Greece?", "Athens", "Thessaloniki", "Sparta", "Corinth"),
    ("What is the capital of Portugal?", "Lisbon", "Porto", "Faro", "Braga"),
    ("What is the capital of Ireland?", "Dublin", "Cork", "Galway", "Limerick"),
    ("What is the capital of Norway?", "Oslo", "Bergen", "Stavanger", "Trondheim"),
    ("What is the capital of Sweden?", "Stockholm", "Gothenburg", "Malmo", "Uppsala"),
    ("What is the capital of Argentina?", "Buenos Aires", "Cordoba", "Rosario", "Mendoza"),
    ("What is the capital of South Korea?", "Seoul", "Busan", "Incheon", "Daegu"),
    ("What is the capital of Thailand?", "Bangkok", "Phuket", "Chiang Mai", "Pattaya"),
    ("What is the capital of Kenya?", "Nairobi", "Mombasa", "Kisumu", "Nakuru"),
    ("What is the capital of Poland?", "Warsaw", "Krakow", "Gdansk", "Wroclaw"),
    ("What is the capital of Austria?", "Vienna", "Salzburg", "Innsbruck", "Graz"),
    ("What is the capital of Cuba?", "Havana", "Holguin", "Varadero", "Trinidad"),
    # landmarks
    ("In which country is the Eiffel Tower?", "France", "Italy", "Germany", "Spain"),
    ("In which country is the Colosseum?", "Italy", "Greece", "Spain", "France"),
    ("In which country is the Great Wall?", "China", "Japan", "India", "Vietnam"),
    ("In which country is the Taj Mahal?", "India", "Pakistan", "Egypt", "Iran"),
    ("In which country is the Statue of Liberty?", "United States", "France", "Canada", "United Kingdom"),
    ("In which country is Big Ben?", "United Kingdom", "France", "Germany", "Ireland"),
    ("In which country are the Pyramids of Giza?", "Egypt", "Mexico", "Morocco", "Greece"),
    ("In which country is Machu Picchu?", "Peru", "Mexico", "Chile", "Colombia"),
    ("In which country is the Sydney Opera House?", "Australia", "New Zealand", "Canada", "South Africa"),
    ("In which country is the Leaning Tower of Pisa?", "Italy", "France", "Spain", "Greece"),
    ("In which country is the Acropolis of Athens?", "Greece", "Italy", "Turkey", "Egypt"),
    ("In which country is Mount Fuji?", "Japan", "China", "South Korea", "Nepal"),
    ("In which country is the Kremlin?", "Russia", "Poland", "Ukraine", "Germany"),
    ("In which country is Stonehenge?", "United Kingdom", "France", "Norway", "Germany"),
    ("In which country is the Brandenburg Gate?", "Germany", "Austria", "Poland", "France"),
    ("In which country is the Grand Canyon?", "United States", "Canada", "Mexico", "Brazil"),
    ("In which country is the Sagrada Familia?", "Spain", "Italy", "France", "Portugal"),
    # continents and geography
    ("On which continent is Brazil?", "South America", "Africa", "Europe", "Asia"),
    ("On which continent is Kenya?", "Africa", "South America", "Asia", "Europe"),
    ("On which continent is Japan?", "Asia", "Europe", "Africa", "South America"),
    ("On which continent is France?", "Europe", "Asia", "Africa", "North America"),
    ("On which continent is Canada?", "North America", "Europe", "Asia", "South America"),
    ("On which continent is India?", "Asia", "Africa", "Europe", "South America"),
    ("On which continent is Nigeria?", "Africa", "Asia", "South America", "Europe"),
    ("On which continent is Argentina?", "South America", "Africa", "Europe", "Asia"),
    ("On which continent is Germany?", "Europe", "Asia", "North America", "Africa"),
    ("On which continent is the South Pole?", "Antarctica", "Africa", "Europe", "Asia"),
    ("What is the largest continent?", "Asia", "Africa", "Europe", "Antarctica"),
    (
        "What is the largest ocean on Earth?",
        "Pacific Ocean",
        "Atlantic Ocean",
        "Indian Ocean",
        "Arctic Ocean",
    ),
    (
        "Which ocean lies between Europe and North America?",
        "Atlantic Ocean",
        "Pacific Ocean",
        "Indian Ocean",
        "Southern Ocean",
    ),
    (
        "What is the tallest mountain in the world?",
        "Mount Everest",
        "Mount Kilimanjaro",
        "Mont Blanc",
        "Mount Fuji",
    ),
    ("What is the longest river in Africa?", "The Nile", "The Amazon", "The Thames", "The Danube"),
    ("What is the largest country in the world by area?", "Russia", "Germany", "Japan", "Mexico"),
    ("What is the largest hot desert in the world?", "The Sahara", "The Gobi", "The Mojave", "The Kalahari"),
    # languages
    ("What language is mainly spoken in Brazil?", "Portuguese", "Spanish", "French", "Italian"),
    ("What language is mainly spoken in Mexico?", "Spanish", "Portuguese", "French", "English"),
    ("What language is mainly spoken in Germany?", "German", "French", "Dutch", "Polish"),
    ("What language is mainly spoken in Japan?", "Japanese", "Chinese", "Korean", "Thai"),
    ("What language is mainly spoken in Italy?", "Italian", "Spanish", "Greek", "German"),
    ("What language is mainly spoken in Egypt?", "Arabic", "Greek", "Turkish", "Persian"),
    ("What language is mainly spoken in Russia?", "Russian", "Polish", "German", "Chinese"),
    ("What language is mainly spoken in France?", "French", "Spanish", "German", "Italian"),
    ("What language is mainly spoken in Greece?", "Greek", "Italian", "Turkish", "Spanish"),
    ("What language is mainly spoken in Portugal?", "Portuguese", "Spanish", "French", "Italian"),
    ("What language is mainly spoken in Argentina?", "Spanish", "Portuguese", "English", "German"),
    ("What language is mainly spoken in Australia?", "English", "French", "German", "Spanish"),
    ("What language is mainly spoken in the Netherlands?", "Dutch", "German", "Danish", "Swedish"),
    ("What language is mainly spoken in China?", "Chinese", "Japanese", "Korean", "Hindi"),
    # currencies
    ("What is the currency of Japan?", "Yen", "Won", "Yuan", "Dollar"),
    ("What is the currency of the United States?", "Dollar", "Euro", "Pound", "Peso"),
    ("What is the currency of the United Kingdom?", "Pound", "Euro", "Dollar", "Franc"),
    ("What is the currency of India?", "Rupee", "Yen", "Dollar", "Peso"),
    ("What is the currency of Germany?", "Euro", "Pound", "Dollar", "Ruble"),
    ("What is the currency of Russia?", "Ruble", "Euro", "Yen", "Rupee"),
    ("What is the currency of Mexico?", "Peso", "Dollar", "Euro", "Real"),
    ("What is the currency of China?", "Yuan", "Yen", "Won", "Rupee"),
    ("What is the currency of Switzerland?", "Swiss franc", "Euro", "Pound", "Krone"),
    ("What is the currency of South Korea?", "Won", "Yen", "Yuan", "Baht"),
    # history
    (
        "Who was the first President of the United States?",
        "George Washington",
        "Abraham Lincoln",
        "Thomas Jefferson",
        "John Adams",
    ),
    ("In which year did World War II end?", "1945", "1918", "1939", "1965"),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong",
        "Buzz Aldrin",
        "Yuri Gagarin",
        "John Glenn",
    ),
    (
        "Who was the first person to travel into space?",
        "Yuri Gagarin",
        "Neil Armstrong",
        "Buzz Aldrin",
        "John Glenn",
    ),
    ("In which year did Christopher Columbus first reach the Americas?", "1492", "1066", "1776", "1812"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Pablo Picasso", "Vincent van Gogh", "Claude Monet"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"),
    (
        "Which ancient people built the pyramids of Giza?",
        "The Egyptians",
        "The Romans",
        "The Vikings",
        "The Aztecs",
    ),
    ("In which year did the United States declare its independence?", "1776", "1492", "1865", "1914"),
    (
        "Which famous wall in Germany fell in 1989?",
        "The Berlin Wall",
        "The Great Wall",
        "Hadrian's Wall",
        "The Western Wall",
    ),
    (
        "Which ship sank in 1912 after hitting an iceberg?",
        "The Titanic",
        "The Mayflower",
        "The Bismarck",
        "The Santa Maria",
    ),
    (
        "Who was the President of the United States during the American Civil War?",
        "Abraham Lincoln",
        "George Washington",
        "John F. Kennedy",
        "Theodore Roosevelt",
    ),
    ("Which country gave the Statue of Liberty to the United States?", "France", "Spain", "Italy", "Germany"),
    (
        "Which Roman city was buried by the eruption of Mount Vesuvius?",
        "Pompeii",
        "Athens",
        "Sparta",
        "Carthage",
    ),
    (
        "Which Indian leader was famous for non-violent protest?",
        "Mahatma Gandhi",
        "Nelson Mandela",
        "Winston Churchill",
        "Napoleon Bonaparte",
    ),
    ("Which country was Napoleon Bonaparte the emperor of?", "France", "Spain", "Russia", "England"),
    (
        "Who was the British Prime Minister during most of World War II?",
        "Winston Churchill",
        "Margaret Thatcher",
        "Tony Blair",
        "David Cameron",
    ),
    (
        "Which brothers made the first powered airplane flight in 1903?",
        "The Wright brothers",
        "The Grimm brothers",
        "The Marx brothers",
        "The Warner brothers",
    ),
]

SCIENCE: list[Fact] = [
    # water, states of matter, weather
    ("At what temperature does water boil at sea level, in degrees Celsius?", "100", "50", "0", "200"),
    ("At what temperature does water freeze, in degrees Celsius?", "0", "100", "50", "-50"),
    ("What is ice made of?", "Frozen water", "Frozen milk", "Salt", "Glass"),
    ("What is the chemical formula of water?", "H2O", "CO2", "O2", "NaCl"),
    ("What is steam?", "Water as a gas", "Frozen water", "A kind of metal", "A kind of rock"),
    ("What state of matter is ice?", "Solid", "Liquid", "Gas", "Plasma"),
    (
        "What do we call water turning into vapour when it is heated?",
        "Evaporation",
        "Freezing",
        "Melting",
        "Condensation",
    ),
    ("What falls from clouds as drops of water?", "Rain", "Snow", "Hail", "Dust"),
    (
        "What are the white flakes of frozen water that fall from the sky in winter called?",
        "Snow",
        "Rain",
        "Fog",
        "Dew",
    ),
    ("What is the coldest season of the year?", "Winter", "Summer", "Spring", "Autumn"),
    ("What is the hottest season of the year?", "Summer", "Winter", "Autumn", "Spring"),
    (
        "What do you see in the sky when sunlight shines through raindrops?",
        "A rainbow",
        "A comet",
        "An eclipse",
        "A shooting star",
    ),
    ("What is lightning?", "A big electric spark", "A falling star", "Burning gas", "Sunlight on clouds"),
    ("What instrument measures temperature?", "Thermometer", "Ruler", "Compass", "Clock"),
    # space
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Earth", "Mars"),
    ("What is the largest planet in our solar system?", "Jupiter", "Earth", "Mars", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Neptune"),
    ("Which planet is famous for its large bright rings?", "Saturn", "Mars", "Mercury", "Venus"),
    ("Which planet do we live on?", "Earth", "Mars", "Venus", "Jupiter"),
    ("How many planets are in our solar system?", "8", "3", "12", "20"),
    ("What is the Sun?", "A star", "A planet", "A moon", "A comet"),
    ("What is the name of Earth's natural satellite?", "The Moon", "The Sun", "Mars", "Venus"),
    ("What is the star closest to Earth?", "The Sun", "The North Star", "Sirius", "The Moon"),
    (
        "How long does it take the Earth to travel once around the Sun?",
        "One year",
        "One day",
        "One week",
        "One hour",
    ),
    (
        "How long does it take the Earth to spin once on its axis?",
        "One day",
        "One year",
        "One month",
        "One minute",
    ),
    (
        "Why does the Moon shine at night?",
        "It reflects light from the Sun",
        "It is on fire",
        "It is made of light bulbs",
        "It is a star",
    ),
    ("What shape is the Earth?", "A sphere", "A cube", "A flat square", "A pyramid"),
    ("Which planet is the hottest in our solar system?", "Venus", "Mercury", "Mars", "Neptune"),
    (
        "What do we use to look at distant stars and planets?",
        "A telescope",
        "A microscope",
        "A thermometer",
        "A stethoscope",
    ),
    # animals
    ("How many legs does a spider have?", "8", "6", "4", "10"),
    ("How many legs does an insect have?", "6", "8", "4", "10"),
    ("What is the largest animal on Earth?", "The blue whale", "The elephant", "The giraffe", "The shark"),
    ("What is the fastest land animal?", "The cheetah", "The horse", "The elephant", "The turtle"),
    ("What is the largest land animal?", "The elephant", "The lion", "The horse", "The bear"),
    ("Which animal is the tallest?", "The giraffe", "The elephant", "The camel", "The zebra"),
    ("What do bees make?", "Honey", "Milk", "Silk", "Wool"),
    ("Which mammal can fly?", "The bat", "The cat", "The dog", "The mouse"),
    ("What does a caterpillar turn into?", "A butterfly", "A frog", "A bird", "A snake"),
    ("What does a tadpole grow into?", "A frog", "A fish", "A butterfly", "A snake"),
    ("What do fish use to breathe underwater?", "Gills", "Lungs", "Fins", "Scales"),
    ("Which of these birds cannot fly?", "Penguin", "Eagle", "Sparrow", "Parrot"),
    ("What kind of animal is a whale?", "A mammal", "A fish", "A reptile", "An insect"),
    ("What kind of animal is a snake?", "A reptile", "A mammal", "An insect", "A fish"),
    ("What kind of animal is a frog?", "An amphibian", "A mammal", "An insect", "A bird"),
    ("Which of these animals lays eggs?", "Chicken", "Dog", "Cow", "Horse"),
    ("What do pandas mostly eat?", "Bamboo", "Fish", "Meat", "Grass seeds"),
    (
        "Where do polar bears live?",
        "In the Arctic",
        "In the Sahara Desert",
        "In the Amazon rainforest",
        "In Antarctica",
    ),
    ("What is the largest bird in the world?", "The ostrich", "The sparrow", "The pigeon", "The robin"),
    (
        "What do we call an animal that eats only plants?",
        "A herbivore",
        "A carnivore",
        "A predator",
        "A scavenger",
    ),
    (
        "What do we call an animal that eats only meat?",
        "A carnivore",
        "A herbivore",
        "An omnivore",
        "A vegetarian",
    ),
    ("What does a cow eat?", "Grass", "Meat", "Fish", "Insects"),
    # the human body
    ("Which organ pumps blood around the body?", "The heart", "The lungs", "The stomach", "The brain"),
    ("Which organ do we use to think?", "The brain", "The heart", "The liver", "The stomach"),
    ("Which organs do we use to breathe?", "The lungs", "The kidneys", "The stomach", "The liver"),
    ("What is the largest organ of the human body?", "The skin", "The heart", "The brain", "The stomach"),
    ("Which gas do humans need to breathe in to live?", "Oxygen", "Carbon dioxide", "Helium", "Hydrogen"),
    ("Which gas do humans breathe out?", "Carbon dioxide", "Helium", "Neon", "Chlorine"),
    ("Which sense do we use our nose for?", "Smell", "Sight", "Hearing", "Touch"),
    ("Which sense do we use our eyes for?", "Sight", "Smell", "Taste", "Hearing"),
    ("What hard part of the head protects the brain?", "The skull", "The ribs", "The spine", "The knee"),
    (
        "Which blood cells fight infections?",
        "White blood cells",
        "Red blood cells",
        "Skin cells",
        "Hair cells",
    ),
    ("Which vitamin does the skin make in sunlight?", "Vitamin D", "Vitamin C", "Vitamin A", "Vitamin K"),
    ("How many teeth does a healthy adult usually have?", "32", "12", "50", "100"),
    ("Which part of the body carries blood back to the heart?", "Veins", "Bones", "Nerves", "Muscles"),
    # plants
    ("What do plants need from the sky to make their food?", "Sunlight", "Moonlight", "Snow", "Wind"),
    (
        "Which gas do plants take from the air to make their food?",
        "Carbon dioxide",
        "Oxygen",
        "Helium",
        "Neon",
    ),
    (
        "What is the process by which plants make food from sunlight called?",
        "Photosynthesis",
        "Digestion",
        "Evaporation",
        "Erosion",
    ),
    (
        "Which part of a plant takes in water from the soil?",
        "The roots",
        "The flowers",
        "The leaves",
        "The fruit",
    ),
    ("What colour are the leaves of most plants?", "Green", "Blue", "Black", "White"),
    ("What does a seed grow into?", "A plant", "A rock", "An animal", "A cloud"),
    (
        "Which part of a plant is often colourful and attracts bees?",
        "The flower",
        "The root",
        "The stem",
        "The bark",
    ),
    ("What green substance in leaves absorbs sunlight?", "Chlorophyll", "Hemoglobin", "Keratin", "Salt"),
    # materials and simple physics
    ("What is the hardest natural material?", "Diamond", "Gold", "Wood", "Glass"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Copper", "Aluminium"),
    ("Which metal is attracted to a magnet?", "Iron", "Gold", "Copper", "Aluminium"),
    ("Which of these is a good conductor of electricity?", "Copper", "Wood", "Plastic", "Rubber"),
    ("Which of these materials is transparent?", "Glass", "Wood", "Stone", "Iron"),
    ("Which metal rusts when it gets wet?", "Iron", "Gold", "Silver", "Platinum"),
    ("What force pulls objects down towards the Earth?", "Gravity", "Magnetism", "Friction", "Wind"),
    ("Which travels fastest?", "Light", "Sound", "A car", "A horse"),
    ("Which direction does a compass needle point to?", "North", "South", "East", "West"),
    (
        "What do we use to look at very small things like cells?",
        "A microscope",
        "A telescope",
        "A thermometer",
        "A barometer",
    ),
    ("What is the chemical symbol for oxygen?", "O", "Ox", "Og", "Gx"),
    (
        "What two gases make up water?",
        "Hydrogen and oxygen",
        "Helium and neon",
        "Carbon and nitrogen",
        "Oxygen and helium",
    ),
    ("What is the main gas in the air we breathe?", "Nitrogen", "Helium", "Hydrogen", "Neon"),
    (
        "What makes the tides in the sea rise and fall?",
        "The Moon's gravity",
        "The wind",
        "Fish swimming",
        "Boats",
    ),
    ("What kind of energy do solar panels use?", "Sunlight", "Wind", "Coal", "Oil"),
    # time
    ("How many hours are in a day?", "24", "12", "36", "60"),
    ("How many minutes are in an hour?", "60", "24", "100", "30"),
    ("How many days are in a week?", "7", "5", "10", "12"),
    ("How many days are in a leap year?", "366", "365", "360", "300"),
    ("How many months are in a year?", "12", "10", "7", "24"),
]

WORDS: list[Fact] = [
    # opposites
    ("What is the opposite of hot?", "Cold", "Warm", "Wet", "Loud"),
    ("What is the opposite of big?", "Small", "Large", "Tall", "Heavy"),
    ("What is the opposite of up?", "Down", "Over", "Left", "High"),
    ("What is the opposite of happy?", "Sad", "Glad", "Funny", "Kind"),
    ("What is the opposite of fast?", "Slow", "Quick", "Loud", "Strong"),
    ("What is the opposite of young?", "Old", "Small", "Happy", "Tall"),
    ("What is the opposite of day?", "Night", "Morning", "Week", "Sun"),
    ("What is the opposite of open?", "Closed", "Wide", "Empty", "Broken"),
    ("What is the opposite of win?", "Lose", "Play", "Score", "Run"),
    ("What is the opposite of tall?", "Short", "Thin", "Light", "Weak"),
    ("What is the opposite of full?", "Empty", "Heavy", "Round", "Closed"),
    ("What is the opposite of rich?", "Poor", "Sad", "Small", "Weak"),
    ("What is the opposite of early?", "Late", "Fast", "Soon", "First"),
    ("What is the opposite of soft?", "Hard", "Quiet", "Smooth", "Warm"),
    ("What is the opposite of wet?", "Dry", "Cold", "Clean", "Warm"),
    ("What is the opposite of loud?", "Quiet", "Bright", "Slow", "Small"),
    ("What is the opposite of push?", "Pull", "Hit", "Move", "Kick"),
    ("What is the opposite of strong?", "Weak", "Tall", "Slow", "Thin"),
    ("What is the opposite of clean?", "Dirty", "Wet", "Empty", "Cold"),
    ("What is the opposite of thick?", "Thin", "Short", "Small", "Light"),
    ("What is the opposite of buy?", "Sell", "Pay", "Spend", "Shop"),
    ("What is the opposite of love?", "Hate", "Like", "Care", "Hope"),
    ("What is the opposite of alive?", "Dead", "Asleep", "Sick", "Old"),
    ("What is the opposite of true?", "False", "Right", "Real", "Sure"),
    ("What is the opposite of first?", "Last", "Second", "Next", "Best"),
    ("What is the opposite of heavy?", "Light", "Strong", "Tall", "Slow"),
    ("What is the opposite of inside?", "Outside", "Under", "Behind", "Between"),
    ("What is the opposite of easy?", "Difficult", "Simple", "Quick", "Fun"),
    # synonyms
    ("Which word means the same as big?", "Large", "Small", "Short", "Thin"),
    ("Which word means the same as small?", "Little", "Huge", "Loud", "Heavy"),
    ("Which word means the same as happy?", "Glad", "Sad", "Angry", "Tired"),
    ("Which word means the same as fast?", "Quick", "Slow", "Late", "Heavy"),
    ("Which word means the same as begin?", "Start", "Finish", "Stop", "Close"),
    ("Which word means the same as finish?", "End", "Start", "Open", "Begin"),
    ("Which word means the same as shut?", "Close", "Open", "Break", "Find"),
    ("Which word means the same as smart?", "Clever", "Silly", "Lazy", "Slow"),
    ("Which word means the same as scared?", "Afraid", "Brave", "Happy", "Calm"),
    ("Which word means the same as gift?", "Present", "Problem", "Lesson", "Letter"),
    ("Which word means the same as wealthy?", "Rich", "Poor", "Young", "Kind"),
    ("Which word means the same as silent?", "Quiet", "Noisy", "Bright", "Busy"),
    ("Which word means the same as simple?", "Easy", "Hard", "Heavy", "Strange"),
    ("Which word means the same as shout?", "Yell", "Whisper", "Sleep", "Listen"),
    ("Which word means the same as beautiful?", "Pretty", "Ugly", "Tired", "Angry"),
    ("Which word means the same as sofa?", "Couch", "Table", "Lamp", "Door"),
    ("Which word means the same as stone?", "Rock", "Leaf", "Cloud", "Bread"),
    ("Which word means the same as talk?", "Speak", "Listen", "Sleep", "Walk"),
    ("Which word means the same as help?", "Assist", "Hurt", "Ignore", "Forget"),
    ("Which word means the same as correct?", "Right", "Wrong", "Late", "Broken"),
    # young animals
    ("What is a baby cat called?", "A kitten", "A puppy", "A calf", "A foal"),
    ("What is a baby dog called?", "A puppy", "A kitten", "A lamb", "A chick"),
    ("What is a baby cow called?", "A calf", "A puppy", "A kitten", "A chick"),
    ("What is a baby horse called?", "A foal", "A kitten", "A chick", "A duckling"),
    ("What is a baby sheep called?", "A lamb", "A puppy", "A foal", "A kitten"),
    ("What is a baby duck called?", "A duckling", "A kitten", "A puppy", "A foal"),
    ("What is a baby chicken called?", "A chick", "A puppy", "A lamb", "A calf"),
    ("What is a baby bear called?", "A cub", "A kitten", "A lamb", "A foal"),
    ("What is a baby kangaroo called?", "A joey", "A puppy", "A chick", "A lamb"),
    ("What is a baby pig called?", "A piglet", "A kitten", "A foal", "A chick"),
    ("What is a baby goat called?", "A kid", "A puppy", "A chick", "A foal"),
    ("What is a baby lion called?", "A cub", "A puppy", "A chick", "A lamb"),
    ("What is a baby deer called?", "A fawn", "A puppy", "A chick", "A duckling"),
    ("What is a baby goose called?", "A gosling", "A kitten", "A puppy", "A calf"),
    # plurals
    ("What is the plural of child?", "Children", "Childs", "Childes", "Childen"),
    ("What is the plural of foot?", "Feet", "Foots", "Footes", "Feets"),
    ("What is the plural of tooth?", "Teeth", "Tooths", "Toothes", "Teeths"),
    ("What is the plural of man?", "Men", "Mans", "Mens", "Manes"),
    ("What is the plural of woman?", "Women", "Womans", "Womens", "Womanes"),
    ("What is the plural of goose?", "Geese", "Gooses", "Geeses", "Goosen"),
    ("What is the plural of person?", "People", "Persones", "Peoples", "Personen"),
    ("What is the plural of box?", "Boxes", "Boxs", "Boxen", "Bixes"),
    ("What is the plural of baby?", "Babies", "Babys", "Babyes", "Babis"),
    ("What is the plural of leaf?", "Leaves", "Leafs", "Leafes", "Leavs"),
    ("What is the plural of knife?", "Knives", "Knifes", "Knifs", "Knivs"),
    ("What is the plural of city?", "Cities", "Citys", "Cityes", "Citis"),
    ("What is the plural of wolf?", "Wolves", "Wolfs", "Wolfes", "Wolvs"),
    # meanings
    ("What does the word 'enormous' mean?", "Very big", "Very small", "Very fast", "Very old"),
    ("What does the word 'ancient' mean?", "Very old", "Very new", "Very loud", "Very small"),
    ("What does the word 'tiny' mean?", "Very small", "Very big", "Very angry", "Very bright"),
    ("What does the word 'exhausted' mean?", "Very tired", "Very happy", "Very hungry", "Very rich"),
    ("What does the word 'furious' mean?", "Very angry", "Very calm", "Very sleepy", "Very small"),
    ("What does the word 'delighted' mean?", "Very pleased", "Very sad", "Very tired", "Very cold"),
    (
        "What does the word 'hungry' mean?",
        "Wanting to eat",
        "Wanting to sleep",
        "Feeling cold",
        "Feeling happy",
    ),
    ("What does the word 'fragile' mean?", "Easily broken", "Very heavy", "Very loud", "Very strong"),
    ("What does the word 'rapid' mean?", "Very fast", "Very slow", "Very wet", "Very old"),
    (
        "What does the word 'brave' mean?",
        "Not afraid of danger",
        "Always tired",
        "Very hungry",
        "Easily scared",
    ),
    (
        "What is a library?",
        "A place where you can borrow books",
        "A place where you buy food",
        "A place where planes land",
        "A place where animals live",
    ),
    (
        "What is a dentist?",
        "A doctor who takes care of teeth",
        "A person who bakes bread",
        "A person who flies planes",
        "A person who fixes cars",
    ),
    (
        "What is a pilot?",
        "A person who flies airplanes",
        "A person who cooks food",
        "A person who teaches children",
        "A person who grows crops",
    ),
    (
        "What is a baker?",
        "A person who makes bread",
        "A person who builds houses",
        "A person who fixes teeth",
        "A person who drives trains",
    ),
    (
        "What is a farmer?",
        "A person who grows crops and raises animals",
        "A person who writes books",
        "A person who flies airplanes",
        "A person who sells shoes",
    ),
    (
        "What is an author?",
        "A person who writes books",
        "A person who fixes cars",
        "A person who cuts hair",
        "A person who catches fish",
    ),
    (
        "What is an airport?",
        "A place where planes take off and land",
        "A place where ships are built",
        "A place where people borrow books",
        "A place where cows live",
    ),
    (
        "What is an umbrella used for?",
        "Keeping dry in the rain",
        "Cutting paper",
        "Cooking food",
        "Telling the time",
    ),
    ("What is a group of wolves called?", "A pack", "A flock", "A school", "A swarm"),
    ("What is a group of cows called?", "A herd", "A pack", "A swarm", "A school"),
]


# ----------------------------------------------------------------------------------------------------------------
# arithmetic


def _near(answer: int, offsets: Sequence[int], rng: random.Random) -> list[int]:
    """Three distinct non-negative wrong answers ``answer + offset``, offsets tried in a seeded order."""
    cands = [answer + d for d in offsets if d != 0 and answer + d >= 0]
    rng.shuffle(cands)
    out = list(dict.fromkeys(cands))[:3]
    assert len(out) == 3, (answer, offsets)
    return out


def arithmetic_facts(n_add: int = 32, n_sub: int = 32, n_mul: int = 32) -> list[Fact]:
    """Generated arithmetic questions, the same on every call: ``a + b`` (1-20 each), ``a - b`` (2-30, result
    0-19), ``a × b`` (2-9 each). The question is ``What is a + b?``; each option is the equation the model would
    write, ``a + b = n``, with the true ``n`` or a close wrong one (±1, ±2, ±10; for products also ± one factor).
    The options share the ``a + b =`` prefix, so only the number (and the end of turn) separates their scores."""
    rng = random.Random(ARITHMETIC_SEED)
    seen: set[tuple[str, int, int]] = set()
    facts: list[Fact] = []
    for op, count in (("+", n_add), ("-", n_sub), ("×", n_mul)):
        k = 0
        while k < count:
            if op == "+":
                a, b = rng.randint(1, 20), rng.randint(1, 20)
                ans, offsets = a + b, (-10, -2, -1, 1, 2, 10)
            elif op == "-":
                a = rng.randint(2, 30)
                b = rng.randint(1, a)
                if a - b >= 20:
                    continue
                ans, offsets = a - b, (-10, -2, -1, 1, 2, 10)
            else:
                a, b = rng.randint(2, 9), rng.randint(2, 9)
                ans, offsets = a * b, (-a, a, -b, b, -1, 1)
            if (op, a, b) in seen:
                continue
            seen.add((op, a, b))
            expr = f"{a} {op} {b}"
            options = [f"{expr} = {n}" for n in (ans, *_near(ans, offsets, rng))]
            facts.append((f"What is {expr}?", *options))
            k += 1
    return facts


# ----------------------------------------------------------------------------------------------------------------
# building and splitting


def _check(category: str, facts: list[Fact]) -> None:
    """Refuses a malformed table (a programming error, so an assertion): four distinct options, unique questions."""
    questions = Counter(f[0] for f in facts)
    dup = [q for q, c in questions.items() if c > 1]
    assert not dup, f"{category}: duplicate questions {dup}"
    for f in facts:
        assert len(f) == 1 + N_OPTIONS and len(set(f[1:])) == N_OPTIONS, f"{category}: bad options in {f}"


def instruction(options: Sequence[str]) -> str:
    """What the question asks of the answer's length, so that a short answer followed by the end of the turn is
    what the model expects (a small chat model otherwise answers in a sentence): one or two words when every
    option has at most two, else a few words."""
    if max(len(o.split()) for o in options) <= 2:
        return " " + SHORT_ANSWER
    return " " + PHRASE_ANSWER


def text_probes(seed: int = 0) -> list[dict[str, Any]]:
    """All probes, as dicts ``{"id", "question", "answer", "options", "category"}``.

    Ids (``world-000`` …) and contents are fixed; ``seed`` shuffles each probe's options and the order of the
    list, deterministically.
    """
    tables = {"world": WORLD, "science": SCIENCE, "arithmetic": arithmetic_facts(), "words": WORDS}
    rng = random.Random(seed)
    probes = []
    for category in CATEGORIES:
        facts = tables[category]
        _check(category, facts)
        for i, (question, answer, *wrong) in enumerate(facts):
            options = [answer, *wrong]
            if category != "arithmetic":
                question += instruction(options)
            rng.shuffle(options)
            probes.append(
                {
                    "id": f"{category}-{i:03d}",
                    "question": question,
                    "answer": answer,
                    "options": options,
                    "category": category,
                }
            )
    rng.shuffle(probes)
    return probes


def split_probes(
    probes: Sequence[dict[str, Any]], seed: int = 0, *, n_val: int = N_VAL
) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [], "val": [...], "test": [...]}``: ``n_val`` probes for validation, the rest for test.

    The probes measure retained knowledge and are never trained on, so ``train`` is always empty. The split is
    stratified: each category gives ``val`` its share of ``n_val`` (largest remainders settle rounding). Which
    probes go where depends only on the probes' ids and ``seed``, not on the order they are passed in.
    """
    ids = Counter(p["id"] for p in probes)
    dup = sorted(i for i, c in ids.items() if c > 1)
    if dup:
        raise ForgetlessError(f"duplicate probe ids {dup[:5]}", remedy="pass each probe once")
    if not 0 <= n_val <= len(probes):
        raise ForgetlessError(
            f"cannot take {n_val} validation probes from {len(probes)}",
            remedy=f"pass n_val between 0 and {len(probes)}",
        )
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(probes, key=lambda p: p["id"]):
        by_cat.setdefault(p["category"], []).append(p)
    cats = sorted(by_cat)
    exact = {c: n_val * len(by_cat[c]) / len(probes) for c in cats}
    quota = {c: int(exact[c]) for c in cats}
    for c in sorted(cats, key=lambda c: (-(exact[c] - quota[c]), c))[: n_val - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    val: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for c in cats:
        group = list(by_cat[c])
        rng.shuffle(group)
        val += group[: quota[c]]
        test += group[quota[c] :]
    rng.shuffle(val)
    rng.shuffle(test)
    return {"train": [], "val": val, "test": test}


# ----------------------------------------------------------------------------------------------------------------
# measuring a model


def probe_accuracy(
    model_dir: str | Path | None = None,
    probes: Sequence[dict[str, Any]] | None = None,
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """Multiple-choice accuracy per category and ``"overall"`` of a model folder (default: the embedded
    SmolLM2-135M-Instruct) on ``probes`` (default: all of :func:`text_probes`), scored by the evaluation
    harness (:func:`forgetless.eval.harness.score_options`)."""
    import torch

    from ..embedded import export_smollm2
    from ..eval.harness import score_options
    from ..stats.data import Encoder, Sample
    from ..stats.run import load_model

    model_dir = Path(model_dir) if model_dir is not None else export_smollm2()
    probes = list(probes) if probes is not None else text_probes()
    model, _ = load_model(model_dir, "cpu", "float32")
    samples = [
        Sample(
            p["id"], None, [("user", p["question"]), ("assistant", p["answer"])], options=tuple(p["options"])
        )
        for p in probes
    ]
    encoder = Encoder(model_dir)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    with torch.no_grad():
        for k in range(0, len(samples), batch_size):
            chunk = samples[k : k + batch_size]
            scored = score_options(model, encoder, chunk, batch_size, tail=False)  # acc only
            for p, sc in zip(probes[k : k + batch_size], scored):
                total[p["category"]] += 1
                right[p["category"]] += p["options"][sc.predicted] == p["answer"]
    acc = {c: right[c] / total[c] for c in CATEGORIES if total[c]}
    acc["overall"] = sum(right.values()) / sum(total.values())
    return acc


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    all_probes = text_probes()
    counts = Counter(p["category"] for p in all_probes)
    for name, value in probe_accuracy(probes=all_probes).items():
        n = counts[name] if name in counts else len(all_probes)
        print(f"{name:<11} {value:6.1%}  ({n} probes)")
