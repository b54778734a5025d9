from quantlab.run import main

main()
