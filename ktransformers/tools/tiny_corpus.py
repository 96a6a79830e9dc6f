"""Training text for the tiny tokenizer: a little English, Chinese, emoji, numbers and code.

Written for this project; it only has to give byte-level BPE enough repeated pieces to learn
a few hundred merges that real prompts (and the tests) will hit.
"""

CORPUS = r"""
Hello! How are you today? I am fine, thank you. What is the weather like in Paris?
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
Please explain the difference between a list and a tuple in Python.
A list can be changed after it is created, while a tuple cannot be changed.
Let me think about this step by step. First, we read the question carefully.
Then we write down what we know, and finally we check the answer twice.
The answer is 42. The sum of 17 and 25 is 42, and 6 times 7 is also 42.
In 2024 the model was trained on 14.8 trillion tokens with 671 billion parameters.
Mixture-of-experts models route every token to a few experts out of many.
Only 37 billion parameters are active for each token, which keeps inference cheap.
Multi-head latent attention compresses the keys and values into a small latent vector.
The server streams tokens to the client as soon as they are generated.
Thank you for your question. Here is a short summary of the main points.
Summary: the model reads the prompt, thinks, and then writes the final answer.
I don't know the answer to that question, but I can try to find out.
Could you please tell me more about what you need? I would be happy to help.
Once upon a time, there was a little robot who wanted to learn how to paint.
Every morning it watched the sun rise and tried to mix the right colors.
Water boils at 100 degrees Celsius and freezes at 0 degrees Celsius.
The capital of France is Paris, the capital of Japan is Tokyo, and the capital of China is Beijing.

你好！今天过得怎么样？我很好，谢谢你。
请解释一下列表和元组在 Python 中的区别。
列表在创建之后可以修改，而元组不能修改。
让我一步一步地思考这个问题。首先，我们仔细阅读题目。
答案是四十二。十七加二十五等于四十二。
混合专家模型把每个词元路由到少数几个专家。
多头潜在注意力把键和值压缩成一个很小的潜在向量。
服务器在生成词元之后立刻把它们发送给客户端。
北京是中国的首都，东京是日本的首都，巴黎是法国的首都。
我不知道这个问题的答案，但是我可以试着找一找。
从前有一个小机器人，它想学习怎样画画。
深度学习模型需要大量的数据和计算资源。
谢谢你的问题。下面是主要内容的简短总结。
人工智能正在改变我们的生活和工作方式。

😀 😃 😄 😁 😆 😅 😂 🤣 🥲 😊 😇 🙂 🙃 😉 😌 😍 🥰 😘
👍 👎 👏 🙏 💪 🎉 🎊 🔥 ✨ 🌟 ⭐ 🚀 💡 📚 ✅ ❌ ❤️ 💙
Great job! 🎉 That works now 👍 Let's ship it 🚀
太棒了！🎉 现在可以用了 👍

def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count

import json
data = {"name": "tiny", "layers": 3, "experts": [1, 2, 3]}
print(json.dumps(data, indent=2))

function add(a, b) {
    return a + b;
}
console.log(add(2, 3));

#include <stdio.h>
int main(void) {
    printf("hello, world\n");
    return 0;
}

SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name ORDER BY name;
$ pip install ktransformers && python -m ktransformers.local_chat --help
https://example.com/docs/index.html?page=2&lang=en
3.14159 2.71828 1.41421 0.5772 1e-6 0x1F 1,000,000 12:30 2025-01-20
"""
